# The worker and API image: routerq's core, producer, worker, Batch API and CLI; no dev stack (demo,
# fake OpenRouter).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY routerq ./routerq
COPY producer ./producer
COPY worker ./worker
COPY cli ./cli
COPY api ./api
RUN pip install --no-cache-dir '.[serve]' && useradd --create-home routerq
USER routerq
ENTRYPOINT ["routerq"]
CMD ["worker", "--concurrency", "64"]
