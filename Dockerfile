# The extproc image (`tollgate serve`). Build and push it to a registry your cluster can pull from:
#   docker build -t registry.example.com/acme/tollgate-extproc:0.1.0 . && docker push registry.example.com/acme/tollgate-extproc:0.1.0
# then name it in your overlay's `images:` (see deploy/overlays/example/kustomization.yaml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home tollgate
USER 10001
EXPOSE 50051 9464 8090
ENTRYPOINT ["tollgate"]
CMD ["serve", "--policy", "/etc/tollgate/policy", "--listen", "0.0.0.0:50051"]
