"""Peer servers for benchmarks/serve_speed.py: the same artifact served the way a LitServe user
or a plain FastAPI user would serve it, for `serve_speed.py --peer litserve --peer fastapi`.

    litserve  A LitServe 0.2 LitAPI. setup() loads the artifact with
              bitcore.predict.Predictor.load(artifact, runtime="torch") (eager PyTorch, WS folded:
              the idiomatic baseline); decode_request reads the uploaded image (the multipart
              field `files`, which LitServe hands over as the parsed form) and preprocesses it
              with Predictor.preprocess; batch() stacks; predict() runs one forward;
              unbatch()/encode_response answer in bitserve's JSON shape (top-5 labels and
              scores). Dynamic batching: max_batch_size=16, batch_timeout=0.005 s (set on the
              LitAPI: LitServe 0.2 deprecates them as LitServer arguments), one inference worker
              (workers_per_device=1, accelerator="cpu"), one API server process.
    fastapi   A FastAPI app with one synchronous endpoint (Starlette's thread pool): decode,
              preprocess and one forward per request, no batching (Predictor.predict).

Both answer POST /predict and GET /healthz (LitServe's health path set to it), so that the
load generator (benchmarks/serve_load.py) sends them the very request it sends bitserve. Both
set torch threads to --threads (and one inter-op thread), as serve_speed.py's servers do.

Process layout: serve_speed.py runs this script through benchmarks/loopback.py with
`--serve-fd FD` (a listening socket bound on 127.0.0.1). LitServer.run binds host:port itself;
here it is handed the inherited socket instead (uvicorn.Config.bind_socket replaced), so the
loopback harness keeps its no-port-race start. LitServe then runs a multiprocessing manager
(its request queue), a spawned inference worker and a forked uvicorn API server: the
benchmark reads the CPU time of the whole process tree (loopback.Server.cpu_seconds). SIGTERM
is turned into KeyboardInterrupt so that LitServer.run shuts its children down.

--batch-log PATH: predict() appends each forward's batch size (one line per forward) so that
the benchmark can report the mean batch LitServe formed, as it does from bitserve's /metrics.
"""

# No `from __future__ import annotations`: LitServe compares decode_request's annotation with
# the Request class itself (a string would make it queue the raw Request, which cannot pickle).

import argparse
import os
import signal
import socket
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from serve_load import PEERS, PREDICT_PATH  # benchmarks/ is sys.path[0] (run as a script)

from bitcore.predict import Predictor, top_k_labels

TOP_K = 5
LITSERVE_MAX_BATCH = 16
LITSERVE_BATCH_TIMEOUT_S = 0.005
HEALTH_PATH = "/healthz"


def answer(classes: list[str], probs: torch.Tensor) -> dict[str, Any]:
    """bitserve's predict response shape for one image's probabilities."""
    ranked = top_k_labels(probs.unsqueeze(0), classes, TOP_K)[0]
    return {"predictions": [{"top_k": [{"label": lab, "score": s} for lab, s in ranked]}]}


def log_batch(path: str | None, size: int) -> None:
    if path is not None:
        # O_APPEND: one small write per forward, read back by the benchmark between rounds.
        with open(path, "a", encoding="ascii") as fh:
            fh.write(f"{size}\n")


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


class BitLitAPI(ls.LitAPI):  # type: ignore[misc]
    """The artifact as a LitServe user serves it. Defined at module level: LitServe pickles
    it into its spawned inference worker, where setup() and the rest run."""

    def __init__(self, artifact: str, threads: int, batch_log: str | None) -> None:
        super().__init__(max_batch_size=LITSERVE_MAX_BATCH, batch_timeout=LITSERVE_BATCH_TIMEOUT_S)
        self.artifact, self.threads, self.batch_log = artifact, threads, batch_log

    def setup(self, device: str) -> None:
        set_threads(self.threads)
        self.predictor = Predictor.load(self.artifact, device, runtime="torch")

    def decode_request(self, request: Request) -> torch.Tensor:
        # LitServe reads this annotation: a Request gets the parsed multipart form.
        data = request["files"].file.read()
        return self.predictor.preprocess([data])[0]

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        log_batch(self.batch_log, x.shape[0])
        return self.predictor.predict_tensor(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return answer(self.predictor.classes, output)


def stop_on_sigterm(main_pid: int) -> Any:
    """SIGTERM as Ctrl+C in LitServe's main process (LitServer.run then stops its children);
    a quiet exit in the children that inherit the handler (its forked API server re-raises the
    signal once uvicorn has shut down)."""

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        raise SystemExit(0)

    return handler


def serve_litserve(sock: socket.socket, artifact: str, threads: int, batch_log: str | None) -> None:
    import uvicorn

    # The one change to LitServe's own start: the socket bound by the harness, not host:port.
    uvicorn.Config.bind_socket = lambda self: sock  # type: ignore[method-assign]
    api = BitLitAPI(artifact, threads, batch_log)
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=1, healthcheck_path=HEALTH_PATH
    )
    signal.signal(signal.SIGTERM, stop_on_sigterm(os.getpid()))
    port = sock.getsockname()[1]
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


def serve_fastapi(sock: socket.socket, artifact: str, threads: int, batch_log: str | None) -> None:
    import uvicorn
    from fastapi import FastAPI, UploadFile

    set_threads(threads)
    predictor = Predictor.load(artifact, "cpu", runtime="torch")
    app = FastAPI()

    @app.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(PREDICT_PATH)
    def predict(files: list[UploadFile]) -> dict[str, Any]:
        # A plain def: Starlette runs it in its thread pool; the Predictor serialises forwards.
        data = files[0].file.read()
        log_batch(batch_log, 1)
        return answer(predictor.classes, predictor.predict_tensor(predictor.preprocess([data]))[0])

    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--serve-fd", type=int, required=True)
    parser.add_argument("--kind", choices=PEERS, required=True)
    parser.add_argument("--artifact", required=True, help="the artifact folder to serve")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batch-log", help="append each forward's batch size here")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.serve_fd)
    serve = serve_litserve if args.kind == "litserve" else serve_fastapi
    serve(sock, args.artifact, args.threads, args.batch_log)


if __name__ == "__main__":
    main()
