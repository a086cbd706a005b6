# The extproc image (`tollgate serve`). Build: docker build -t ghcr.io/tollgate/extproc:0.1.0 .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home tollgate
USER 10001
EXPOSE 50051 9464 8090
ENTRYPOINT ["tollgate"]
CMD ["serve", "--policy", "/etc/tollgate/policy", "--listen", "0.0.0.0:50051"]
