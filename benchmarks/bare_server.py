"""The peer that `serve_load.py` measures Serve against: what a user would write by hand, one
uvicorn process with FastAPI around the same `Retriever`.

    .venv/bin/python benchmarks/bare_server.py --root runs/default --port 8100
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from entityclip import Retriever


class TextQuery(BaseModel):
    text: str
    k: int = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/default")
    parser.add_argument("--variant", default="entityclip")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--rerank", default="auto", help="serve.rerank: auto | none | itm | late_interaction | xattn_fusion")
    args = parser.parse_args()

    retriever = Retriever.load(args.root, args.variant, rerank=args.rerank)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return retriever.health()

    @app.post("/search/text")
    def search_text(query: TextQuery) -> dict:
        return retriever.search_text(query.text, query.k)

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
