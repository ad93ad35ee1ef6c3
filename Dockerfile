# The one SpecMesh image: every service is `specmesh serve NAME` in it (see compose.yaml).
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md alembic.ini ./
COPY requirements ./requirements
COPY shared ./shared
COPY services ./services
COPY migrations ./migrations
# On a GPU host install the CUDA build of the same torch version first (TORCH_INDEX).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX} && pip install --no-cache-dir -e .
ENV SPECMESH_MODELS__CACHE_DIR=/models PYTHONUNBUFFERED=1
ENTRYPOINT ["specmesh"]
