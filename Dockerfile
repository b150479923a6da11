# The EDGELESS guest: an erpy function served over gRPC (python3 -m erpy.edgeless).
#
#   docker build -t python-function .
#   docker run -it --rm --network host python-function
#   docker run -it --rm --network host --env FUNCTION=my_function \
#       -v $PWD/my_function.py:/opt/erpy/functions/my_function.py python-function
#
# Settings (environment): FUNCTION (the function: 'module' or 'module:Class'; default the
# demo that python3 -m erpy.edgeless.node_cli drives), PORT (7101), MAX_WORKERS (10),
# LOG_LEVEL (INFO). Functions are imported from /opt/erpy/functions too. See doc/function.md.

# Build stage: erpy's Python extension (the term codec erpy imports) and the gRPC stubs,
# both from Debian packages only.
FROM debian:bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config zlib1g-dev libgtest-dev \
        python3 python3-dev libpython3.11-dev \
        python3-grpcio python3-protobuf protobuf-compiler protobuf-compiler-grpc libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY c_src c_src
COPY python python
COPY proto proto
COPY scripts/gen_proto.sh scripts/gen_proto.sh
RUN rm -rf python/erpy/*.so python/erpy/edgeless/_gen \
    && cmake -S . -B /tmp/build -DCMAKE_BUILD_TYPE=Release -DERPY_PYTHON=/usr/bin/python3 \
        -DERPY_WERROR=OFF \
    && cmake --build /tmp/build --target erpy_native -j"$(nproc)" \
    && scripts/gen_proto.sh \
    && python3 -m compileall -q python/erpy

# Run stage: Python, gRPC and protobuf, and erpy's python/ tree.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-grpcio python3-protobuf zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/python/erpy /opt/erpy/python/erpy
RUN mkdir -p /opt/erpy/functions && useradd --system --no-create-home erpy
ENV PYTHONPATH=/opt/erpy/python:/opt/erpy/functions \
    LOG_LEVEL=INFO \
    PORT=7101 \
    MAX_WORKERS=10
USER erpy
EXPOSE 7101/tcp
CMD ["python3", "-m", "erpy.edgeless"]
