"""The baseline for bench_http: the captioning server a tutorial would have you write.

One FastAPI endpoint that reads the upload, decodes it with PIL and calls
``Captioner.caption_images([image])``: batch 1, no batching across requests, no JPEG draft
decoding, and FastAPI's thread pool running as many model calls at once as there are requests.
It is a benchmark's yardstick, not part of the product.

    python -m benchmarks.naive_server --port 8001 [--model DIR] [--encoder-runtime torch]

``--encoder-runtime torch`` (the default) is the plain PyTorch model a tutorial loads;
``auto`` gives it captioner's ONNX Runtime CNN as well, so the reader can see what the
server's batching adds on top of the faster encoder.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from captioner.inference import Captioner


def create_app(model: Path | None, encoder_runtime: str, device: str = "cpu") -> FastAPI:
    captioner = Captioner.load(model, device=device, encoder_runtime=encoder_runtime)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/caption")
    def caption(file: UploadFile = File(...)) -> dict[str, str]:  # noqa: B008 (FastAPI's idiom)
        image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
        return {"caption": captioner.caption_images([image])[0].caption}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--encoder-runtime", choices=["torch", "auto"], default="torch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    args = parser.parse_args()
    app = create_app(args.model, args.encoder_runtime, args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
