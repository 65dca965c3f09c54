# forecaster daemon image (not built in CI: these machines have no Docker engine).
#   docker build -t forecaster .
#   docker run --rm -e FORECASTER_MQTT__HOST=broker -e FORECASTER_METRICS__HOST=0.0.0.0 \
#       -p 9108:9108 -v forecaster-state:/var/lib/forecaster forecaster
FROM python:3.11-slim
RUN useradd --system --home /var/lib/forecaster forecaster \
    && mkdir -p /var/lib/forecaster && chown forecaster /var/lib/forecaster
WORKDIR /opt/forecaster
COPY pyproject.toml README.md ./
COPY forecaster ./forecaster
COPY simulators ./simulators
COPY configs ./configs
# CPU build of torch first: an unpinned install pulls a CUDA build of several GB.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .
USER forecaster
ENV FORECASTER_STATE__DIR=/var/lib/forecaster
VOLUME /var/lib/forecaster
EXPOSE 9108
CMD ["forecaster", "run", "-c", "/opt/forecaster/configs/default.yaml"]
