"""EntityCLIP Platform: entity-centric image-text matching on Ray."""

__version__ = "0.1.0"

__all__ = ["Retriever"]


def __getattr__(name: str):
    # Lazy: `import entityclip` (the CLI's --help, configs) must not pay for torch and FAISS.
    if name == "Retriever":
        from entityclip.retrieval import Retriever

        return Retriever
    raise AttributeError(f"module 'entityclip' has no attribute {name!r}")
