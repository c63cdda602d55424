"""tritonclient's gRPC client as a separate process for the fuzz suite: its protobufs (package ``inference``) clash
with kserve's in one process's descriptor pool, so it runs here, one JSON request per stdin line, one JSON answer
per stdout line: ``{"status": "ok" | "StatusCode.X", "message": ...}``.

Requests: ``{"op": "infer", "params": {...}, "tensors": "reset" | "none", "datatype": {name: dt}}``,
``{"op": "load_model" | "unload_model" | "ready"}``; every call sends the ``headers`` given at start (argv[2]).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

MODEL = "lingbot-va"


def tensors(kind: str) -> dict[str, tuple[str, np.ndarray]]:
    if kind == "none":
        return {}
    rng = np.random.default_rng(1)
    return {"images": ("UINT8", rng.integers(0, 256, (1, 2, 32, 32, 3), dtype=np.uint8)),
            "state": ("FP32", np.array([[0.05, 0.6, 0.2, 0.5]], np.float32))}


def handle(client: tgrpc.InferenceServerClient, req: dict, headers: dict) -> dict:
    op = req["op"]
    try:
        if op == "infer":
            inputs = []
            for name, (dt, array) in tensors(req.get("tensors", "reset")).items():
                t = tgrpc.InferInput(name, list(array.shape), dt)
                t.set_data_from_numpy(array)
                if name in req.get("datatype", {}):
                    t._input.datatype = req["datatype"][name]  # what a careless client sends
                inputs.append(t)
            result = client.infer(MODEL, inputs, parameters=req["params"], headers=headers)
            return {"status": "ok", "message": "accepted",
                    "chunk_index": result.get_response().parameters["chunk_index"].int64_param}
        if op == "ready":
            return {"status": "ok", "message": "",
                    "ready": bool(client.is_server_ready(headers=headers) and client.is_model_ready(MODEL))}
        getattr(client, op)(MODEL, headers=headers)
        return {"status": "ok", "message": "accepted"}
    except InferenceServerException as err:
        return {"status": err.status() or "", "message": err.message() or ""}


def main() -> None:
    client = tgrpc.InferenceServerClient(sys.argv[1])
    headers = json.loads(sys.argv[2])
    for line in sys.stdin:
        print(json.dumps(handle(client, json.loads(line), headers)), flush=True)


if __name__ == "__main__":
    main()
