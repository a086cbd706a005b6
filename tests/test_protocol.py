"""Our own ext_proc protocol definition: generated code is fresh, field numbers match Envoy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.pb import ext_proc_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("proto", ["ext_proc", "als"])
def test_generated_code_is_not_stale(tmp_path: Path, proto: str) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"extproc/pb/{proto}.proto"], check=True, cwd=ROOT)
    for name in (f"{proto}_pb2.py", f"{proto}_pb2.pyi"):
        fresh = (tmp_path / "extproc" / "pb" / name).read_text()
        assert (ROOT / "extproc" / "pb" / name).read_text() == fresh, f"{name} is stale: run `make protos`"


def test_service_method_is_envoys() -> None:
    service = pb.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert service.methods_by_name["Process"].client_streaming


def test_field_numbers_match_envoy_v3() -> None:
    """The numbers from envoy/service/ext_proc/v3/external_processor.proto. The end-to-end tests
    prove them against the real Envoy (headers read, body replaced, immediate responses sent)."""
    def numbers(msg: type) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.ProcessingRequest) == {
        "request_headers": 2, "response_headers": 3, "request_body": 4, "response_body": 5,
        "request_trailers": 6, "response_trailers": 7, "metadata_context": 8, "attributes": 9, "observability_mode": 10}
    assert numbers(pb.ProcessingResponse) == {
        "request_headers": 1, "response_headers": 2, "request_body": 3, "response_body": 4, "request_trailers": 5,
        "response_trailers": 6, "immediate_response": 7, "dynamic_metadata": 8, "mode_override": 9}
    assert numbers(pb.CommonResponse) == {"status": 1, "header_mutation": 2, "body_mutation": 3, "clear_route_cache": 5}
    assert numbers(pb.ImmediateResponse) == {"status": 1, "headers": 2, "body": 3, "details": 5}
    assert numbers(pb.HeaderValue) == {"key": 1, "value": 2, "raw_value": 3}
