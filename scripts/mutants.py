"""`make mutants`: a small mutation run over the money and fallback core.

Each mutant changes one token on one line (a comparison or boundary flip, `+`/`-`, a constant
off by one, `and`/`or`, a dropped `not`, `min`/`max`, a ceiling division made a floor, a
dropped element of a literal list, ...). The mutant is written into a scratch copy of the
repository (never the work tree), and only the test files that can kill it run there, fastest
first, stopping at the first failure. A mutant is *killed* when a test fails or times out,
*survived* when every test passes. The run prints each mutant, who killed it, and the kill
rate; it exits non-zero below `--min-rate`.

Mutants are listed in source order and capped per file by a deterministic sample (a hash of
file, line and change), so two runs on the same code test the same mutants.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """One mutated file: the tests that can kill its mutants (fastest first), an optional set
    of functions to confine mutants to, and how many of its mutants to sample."""

    path: str
    tests: tuple[str, ...]
    only: tuple[str, ...] = ()  # function / constant names; empty: the whole file
    cap: int = 24


TARGETS = (
    Target("extproc/money.py", ("tests/test_money_unit.py",), cap=16),
    Target("extproc/caps.py", ("tests/test_caps_bounds.py", "tests/test_answer_bound.py", "tests/test_caps.py", "tests/test_reserve_lua.py"),
           cap=30),
    Target("extproc/chains.py", ("tests/test_chains_edges.py", "tests/test_chains.py"), cap=30),
    Target("extproc/decide.py", ("tests/test_decide.py", "tests/test_policy_model.py"), cap=16),
    Target("extproc/policy/model.py", ("tests/test_policy_model.py", "tests/test_caps.py", "tests/test_chains.py", "tests/test_decide.py"),
           only=("cost_micro", "allows_route", "rule", "max_attempts", "ttfb_s", "idle_s"), cap=12),
    Target("extproc/health.py", ("tests/test_health_unit.py",), cap=20),
    Target("extproc/timeouts.py", ("tests/test_timeouts_unit.py",), cap=10),
    Target("extproc/edge.py", ("tests/test_edge_policy.py", "tests/test_edge_gate.py"),
           only=("CLIENT_HEADERS", "GATEWAY_HEADERS", "RESERVED_HEADERS", "gate_lua", "_lua_set"), cap=12),
    Target("extproc/errors.py", ("tests/test_errors_unit.py", "tests/test_caps.py", "tests/test_decide.py"),
           only=("rate_limited", "request_too_large"), cap=6),
    Target("extproc/lua/reserve.lua", ("tests/test_reserve_lua_edges.py", "tests/test_reserve_lua.py"), cap=24),
    Target("extproc/lua/finish.lua", ("tests/test_reserve_lua_edges.py", "tests/test_reserve_lua.py"), cap=10),
)


# Survivors judged equivalent (no input the gateway can receive tells them apart), keyed by
# file, the mutated line's text (stripped), the change and its column in that text. Printed
# next to the survivor; they still count against the kill rate.
EQUIVALENT: dict[tuple[str, str, str, str, int], str] = {
    ("extproc/caps.py", 'if path == "/v1/completions" and isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):',
     "all", "any", 77): "differs only for a prompt list mixing token ids and strings, which no client API accepts",
    ("extproc/caps.py", "if f != honoured and isinstance(v, int) and v > cap:", ">", ">=", 46):
        "writing the cap into a field that already equals it changes nothing",
    ("extproc/health.py", "current = int(now_s // size)", "//", "/", 20):
        "int(t / size) == int(t // size) for the non-negative wall-clock time it is given",
    ("extproc/health.py", "size = max(1, p.circuit_window_s // BUCKETS)", "//", "/", 33):
        "the size only lengthens an expiry; Redis truncates the Lua number, so w + w / 10 expires as w + w // 10",
    ("extproc/health.py", "if now >= self.next_probe.get(provider, 0.0):", ">=", ">", 7):
        "differs only when the monotonic clock equals the probe time to the last bit",
    **{("extproc/lua/reserve.lua", "if q * d > x then q = q - 1 elseif (q + 1) * d <= x then q = q + 1 end", "1", "2", col):
        "floor_div's corrections never apply: below 2^52 (the processor's bound) math.floor(x / d) is exact" for col in (26, 40, 65)},
    ("extproc/lua/reserve.lua", "local reset = math.ceil((best.capacity - (best.tokens - math.min(cost, best.capacity))) / best.rate)",
     "-", "+", 54): "report() is only ever called with cost 0, so math.min(cost, capacity) is 0 and -0 == +0",
    ("extproc/lua/finish.lua", "return 1", "1", "2", 7): "Quota.finish ignores the script's reply (only an error matters)",
    ("extproc/lua/reserve.lua", "local ws_budget = override(K.ws_limits, 'monthly_budget_micro', -1)", "1", "2", 65):
        "any negative default means 'no workspace budget' (the next line tests >= 0)",
    ("extproc/lua/finish.lua", "if cost > 0 then", ">", ">=", 8):
        "with cost 0 the balance and spends change by 0 (only an empty spend key may appear)",
    ("extproc/lua/reserve.lua", "if balance <= 0 then return refuse('balance', 0, cost(req.min), balance - cust_reserved) end", "0", "1", 46):
        "a money refusal's retry-after is never used (insufficient_quota has no Retry-After)",
}


def equivalence(m: Mutant) -> str:
    """Why a surviving mutant is equivalent, when it is one of the known ones."""
    line = (ROOT / m.path).read_text().split("\n")[m.line - 1]
    indent = len(line) - len(line.lstrip())
    return EQUIVALENT.get((m.path, line.strip(), m.old, m.new, m.col - indent), "")


@dataclass(frozen=True)
class Mutant:
    path: str
    line: int  # 1-based
    col: int  # 0-based start of the changed text on the line
    old: str
    new: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def apply(self, source: str) -> str:
        lines = source.split("\n")
        text = lines[self.line - 1]
        assert text[self.col:self.col + len(self.old)] == self.old, (self, text)
        lines[self.line - 1] = text[:self.col] + self.new + text[self.col + len(self.old):]
        return "\n".join(lines)


@dataclass
class Result:
    mutant: Mutant
    killed: bool
    by: str = ""
    seconds: float = 0.0
    detail: str = field(default="", repr=False)


# --- Python mutants --------------------------------------------------------------------------

OP_SWAPS = {"<": ["<="], "<=": ["<"], ">": [">="], ">=": [">"], "==": ["!="], "!=": ["=="],
            "+": ["-"], "-": ["+"], "//": ["/"], "+=": ["-="], "-=": ["+="]}
NAME_SWAPS = {"and": ["or"], "or": ["and"], "True": ["False"], "False": ["True"], "min": ["max"], "max": ["min"],
              "any": ["all"], "all": ["any"]}
CEIL_DIV = re.compile(r"-\(-(?P<a>[^()]+?) // (?P<b>[\w.]+)\)")


def _int_value(tok: str) -> int | None:
    try:
        return int(tok.replace("_", ""), 0)
    except ValueError:
        return None


def _allowed_lines(source: str, only: tuple[str, ...]) -> set[int] | None:
    """Lines of the named functions / module constants (all lines when `only` is empty),
    without docstrings."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    if not only:
        return {i for i in range(1, source.count("\n") + 2)} - docstrings
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        if name in only:
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines - docstrings


def python_mutants(path: str, source: str, only: tuple[str, ...]) -> list[Mutant]:
    allowed = _allowed_lines(source, only) or set()
    lines = source.split("\n")
    out: list[Mutant] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        (row, col), (erow, _) = tok.start, tok.end
        if row != erow or row not in allowed:
            continue
        text = lines[row - 1]
        if text.lstrip().startswith(("import ", "from ", "def ", "class ", "@")):
            continue
        prev = tokens[i - 1].string if i else ""
        if tok.type == tokenize.OP and tok.string in OP_SWAPS:
            if tok.string == "-" and tokens[i + 1].string == "(" and tokens[i + 2].string == "-":
                continue  # the outer `-` of a ceiling division: the CEIL_DIV mutant covers it
            for new in OP_SWAPS[tok.string]:
                out.append(Mutant(path, row, col, tok.string, new))
        elif tok.type == tokenize.NAME and tok.string in NAME_SWAPS:
            for new in NAME_SWAPS[tok.string]:
                out.append(Mutant(path, row, col, tok.string, new))
        elif tok.type == tokenize.NAME and tok.string == "not" and tokens[i + 1].string == "in":
            if text[col:col + 6] == "not in":
                out.append(Mutant(path, row, col, "not in", "in"))
        elif tok.type == tokenize.NAME and tok.string == "not" and prev == "is":
            out.append(Mutant(path, row, col, "not ", ""))
        elif tok.type == tokenize.NAME and tok.string == "is" and tokens[i + 1].string != "not":
            out.append(Mutant(path, row, col, "is", "is not"))
        elif tok.type == tokenize.NAME and tok.string == "not":
            out.append(Mutant(path, row, col, "not ", ""))
        elif tok.type == tokenize.NAME and tok.string == "in" and prev != "not" and not _loop_in(tokens, i):
            out.append(Mutant(path, row, col, "in", "not in"))
        elif tok.type == tokenize.NUMBER and prev != "[":
            value = _int_value(tok.string)
            if value is not None:
                out.append(Mutant(path, row, col, tok.string, str(value + 1)))
                if value > 0:
                    out.append(Mutant(path, row, col, tok.string, str(value - 1)))
    for row in sorted(allowed):
        text = lines[row - 1] if row <= len(lines) else ""
        for m in CEIL_DIV.finditer(text):
            out.append(Mutant(path, row, m.start(), m.group(0), f"({m.group('a')} // {m.group('b')})"))
    out += _element_drops(path, source, allowed)
    return [m for m in out if _compiles_differently(source, m)]


def _loop_in(tokens: list[tokenize.TokenInfo], i: int) -> bool:
    """Whether the `in` at `i` is a loop's (`for x in ...`), not a membership test."""
    for tok in reversed(tokens[:i]):
        if tok.string == "for":
            return True
        if tok.string in ("if", "and", "or", "return", "=", "(", "[", ",", "not") or tok.type == tokenize.NEWLINE:
            return False
    return False


def _element_drops(path: str, source: str, allowed: set[int]) -> list[Mutant]:
    """Drop one element of a one-line literal tuple / list / set of two or more elements."""
    out: list[Mutant] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or len(node.elts) < 2:
            continue
        if node.lineno != node.end_lineno or node.lineno not in allowed:
            continue
        if not all(isinstance(e, (ast.Constant, ast.Starred)) for e in node.elts):
            continue
        line = source.split("\n")[node.lineno - 1]
        for k, e in enumerate(node.elts):
            start = e.col_offset
            end = node.elts[k + 1].col_offset if k + 1 < len(node.elts) else (e.end_col_offset or start)
            if k + 1 == len(node.elts):  # the last: drop the separator before it instead
                start = (node.elts[k - 1].end_col_offset or start)
            out.append(Mutant(path, node.lineno, start, line[start:end], ""))
    return out


def _compiles_differently(source: str, m: Mutant) -> bool:
    try:
        mutated = m.apply(source)
        return ast.dump(ast.parse(mutated)) != ast.dump(ast.parse(source))
    except (SyntaxError, AssertionError):
        return False


# --- Lua mutants ---------------------------------------------------------------------------

LUA_TOKEN = re.compile(r"--.*$|'[^']*'|\"[^\"]*\"|<=|>=|~=|==|<|>|\+|-|\*|/|\b(?:and|or|not)\b|"
                       r"math\.(?:floor|ceil|min|max)\b|\b\d+\b")
LUA_SWAPS = {"<": ["<="], "<=": ["<"], ">": [">="], ">=": [">"], "==": ["~="], "~=": ["=="], "+": ["-"], "-": ["+"],
             "*": ["/"], "/": ["*"], "and": ["or"], "or": ["and"], "math.floor": ["math.ceil"],
             "math.ceil": ["math.floor"], "math.min": ["math.max"], "math.max": ["math.min"]}


def lua_mutants(path: str, source: str) -> list[Mutant]:
    out: list[Mutant] = []
    for row, text in enumerate(source.split("\n"), start=1):
        for m in LUA_TOKEN.finditer(text):
            tok = m.group(0)
            if tok.startswith(("--", "'", '"')):
                continue
            if tok in LUA_SWAPS:
                out += [Mutant(path, row, m.start(), tok, new) for new in LUA_SWAPS[tok]]
            elif tok == "not":
                out.append(Mutant(path, row, m.start(), "not ", ""))
            elif tok.isdigit() and not text[:m.start()].rstrip().endswith("["):  # KEYS[n] / ARGV[n] / t[1]
                value = int(tok)
                out.append(Mutant(path, row, m.start(), tok, str(value + 1)))
                if value > 0:
                    out.append(Mutant(path, row, m.start(), tok, str(value - 1)))
    return [m for m in out if m.apply(source) != source]


# --- sampling and running ------------------------------------------------------------------

def mutants_of(target: Target, scale: float = 1.0) -> list[Mutant]:
    source = (ROOT / target.path).read_text()
    found = lua_mutants(target.path, source) if target.path.endswith(".lua") else python_mutants(target.path, source, target.only)
    unique = list(dict.fromkeys(found))
    cap = int(target.cap * scale)
    if len(unique) > cap:
        rank = sorted(unique, key=lambda m: hashlib.sha1(f"{m.path}:{m.line}:{m.col}:{m.old}->{m.new}".encode()).hexdigest())
        keep = set(rank[:cap])
        unique = [m for m in unique if m in keep]
    return sorted(unique, key=lambda m: (m.line, m.col, m.new))


def make_copy(base: Path) -> Path:
    """A scratch copy of the tracked files (plus the generated protobuf modules): mutants are
    written there, so an interrupted run never leaves a mutant in the work tree."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "extproc" / "pb").glob("*.py*")]
    for rel in files:
        if not rel or not (ROOT / rel).is_file():
            continue
        dest = base / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    for rel in {t.path for t in TARGETS} | {s for t in TARGETS for s in t.tests}:
        if (ROOT / rel).is_file():  # new files not yet committed
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, base / rel)
    return base


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+?)(?: - |$)", re.M)


def run_tests(workdir: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[bool, str, str]:
    """(passed, first failing test, output tail) of the given test files in `workdir`."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(workdir)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--noconftest", "-p", "no:cacheprovider",
           f"--timeout={int(timeout_s)}", *tests]
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s + 15)
    except subprocess.TimeoutExpired:
        return False, "(timeout)", ""
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return True, "", out[-400:]
    failed = FAILED.search(out)
    return False, failed.group(1) if failed else f"(exit {proc.returncode})", out[-1500:]


def run_mutant(workdir: Path, target: Target, m: Mutant, timeout_s: float) -> Result:
    path = workdir / m.path
    original = path.read_text()
    path.write_text(m.apply(original))
    started = time.monotonic()
    try:
        passed, by, tail = run_tests(workdir, target.tests, timeout_s)
    finally:
        path.write_text(original)
    return Result(m, killed=not passed, by=by, seconds=time.monotonic() - started, detail=tail)


def describe(m: Mutant) -> str:
    return f"{m.where:<28} {m.old!r} -> {m.new!r}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant's test run")
    ap.add_argument("--only", default="", help="mutate only targets whose path contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every file's mutant cap (e.g. 100: all)")
    ap.add_argument("--min-rate", type=float, default=0.90)
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args(argv)

    targets = [t for t in TARGETS if args.only in t.path]
    plan = [(t, m) for t in targets for m in mutants_of(t, args.scale)]
    if args.list:
        for _, m in plan:
            print(describe(m))
        print(f"{len(plan)} mutants")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tollgate-mutants-") as tmp:
        copies = [make_copy(Path(tmp) / f"w{i}") for i in range(args.workers)]
        for t in targets:  # the unmutated tests must pass, or every mutant looks killed
            passed, by, tail = run_tests(copies[0], t.tests, args.timeout)
            if not passed:
                print(f"baseline failed for {t.path}: {by}\n{tail}")
                return 2
        print(f"{len(plan)} mutants over {len(targets)} files, {args.workers} workers")
        free = list(copies)
        results: list[Result] = []

        def work(item: tuple[Target, Mutant]) -> Result:
            workdir = free.pop()
            try:
                return run_mutant(workdir, item[0], item[1], args.timeout)
            finally:
                free.append(workdir)

        with ThreadPoolExecutor(args.workers) as pool:
            for r in pool.map(work, plan):
                results.append(r)
                why = equivalence(r.mutant)
                verdict = f"killed by {r.by}" if r.killed else f"SURVIVED (equivalent: {why})" if why else "SURVIVED"
                print(f"{describe(r.mutant)}  {verdict}  ({r.seconds:.1f}s)", flush=True)

    killed = sum(r.killed for r in results)
    rate = killed / len(results) if results else 1.0
    survivors = [r for r in results if not r.killed]
    print(f"\nkill rate: {killed}/{len(results)} = {rate:.1%} in {time.monotonic() - started:.0f}s")
    for r in survivors:
        why = equivalence(r.mutant)
        print(f"  survived: {describe(r.mutant)}  {'equivalent: ' + why if why else 'NOT KNOWN TO BE EQUIVALENT'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "killed": killed, "total": len(results), "rate": round(rate, 4), "seconds": round(time.monotonic() - started),
            "mutants": [{**asdict(r.mutant), "killed": r.killed, "by": r.by, "seconds": round(r.seconds, 1),
                         **({} if r.killed else {"equivalent": equivalence(r.mutant)})} for r in results],
        }, indent=1) + "\n")
    return 0 if rate >= args.min_rate else 1


if __name__ == "__main__":
    sys.exit(main())
