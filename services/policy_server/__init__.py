"""The LingBot-VA policy server: a KServe custom predictor serving action chunks to many robots.

One V2 model (default name ``lingbot-va``) over REST and gRPC with binary tensors (wire contract:
``services.protocol``). Each robot episode is a session holding its KV cache and VAE stream on the server; the
server runs Algorithm 2 (async, FDM-grounded) or Algorithm 1 (sync), batches concurrent sessions' model passes,
bounds its sessions (count, idle time, memory), follows a registry alias to new model versions without failing a
request, and exports Prometheus metrics on /metrics.

    lingbot serve --model models:/lingbot-va-reach-v3@champion --http_port 8080 --grpc_port 8081

Modules: ``settings`` (ServeSettings, ``LINGBOT_SERVE_*``), ``models`` (loading, alias watching), ``sessions``
(Session, SessionStore), ``batcher``, ``engine`` (the request logic), ``predictor`` (the kserve.Model), ``guards``
(field-by-field wire checks), ``rest`` / ``grpc_api`` (the V2 routes and service), ``server`` (ModelServer bound to a
host, auth, size limit), ``commands`` / ``__main__`` (entry points).
"""
