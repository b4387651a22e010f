# The worker and API image: the routerq package (routerq/ links producer/ and worker/ from the top).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY routerq ./routerq
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir '.[serve]' && useradd --create-home routerq
USER routerq
ENTRYPOINT ["routerq"]
CMD ["worker", "--concurrency", "64"]
