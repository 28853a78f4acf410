"""What ``embedstream serve`` serves: one model, loaded as the stream embeds with it.

With a store, the model is the table's, from the lineage the sink records (as
``embedstream search`` loads it: :func:`flows.search.query_embedder`), and documents get
the prompt the stream used (``prompt_name`` of the lineage). Without one, it is the
configured model (``EMBEDSTREAM_MODEL``, ``EMBEDSTREAM_TRUNCATE_DIM``,
``EMBEDSTREAM_PROMPT_NAME``: the flow's own settings)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flows.search import (
    SearchError,
    choose_table,
    load_reranker,
    query_embedder,
    query_prompt_name,
    query_sparse_encoder,
)
from flows.settings import Settings
from flows.stores import StoreError, TableSpec, open_store
from operators import Embedder, models

log = logging.getLogger("embedstream.serve")


@dataclass
class Served:
    embedder: Embedder
    #: The name responses give as ``model``: the table's model id, else the model's.
    model_name: str
    #: Names a request's ``model`` may use.
    names: frozenset[str]
    #: The prompt text for each ``input_type`` (None: the model's default prompt).
    prompts: dict[Optional[str], Optional[str]]
    #: Whether ``dimensions`` below the model's may be asked for.
    matryoshka: bool
    #: The store of /search (None: embeddings only) and its table chosen at start, if any.
    store_url: Optional[str] = None
    table: Optional[str] = None
    spec: Optional[TableSpec] = None
    #: The table's sparse model, for the sparse signal of /search (None: not loaded).
    sparse: Any = None
    #: The cross-encoder of /rerank and of /search's ``rerank`` (None: --rerank not given).
    reranker: Any = None

    def compatible(self, spec: TableSpec) -> Optional[str]:
        """Why queries embedded here cannot search table ``spec`` (None: they can)."""
        e = self.embedder
        if spec.model_revision != e.model_revision or spec.dimension != e.dim:
            return (
                f"table {spec.name} holds {spec.model_id} (revision {spec.model_revision}, dim "
                f"{spec.dimension}); this server embeds with {self.model_name} (revision "
                f"{e.model_revision}, dim {e.dim}): start one for that table with --table"
            )
        return None


def load(
    settings: Settings,
    *,
    store: Optional[str],
    table: Optional[str],
    model: Optional[str],
    rerank: Optional[str] = None,
    sparse_model: Optional[str] = None,
) -> Served:
    """The served model. ``store``: the store of /search (None: embeddings only); ``model``:
    a model given explicitly (with a store it overrides the table's lineage); ``rerank``:
    a cross-encoder directory; ``sparse_model``: the query side of the table's sparse
    vectors (default: ``EMBEDSTREAM_SPARSE_MODEL``, else the lineage's model id)."""
    spec = None
    if store is not None:
        from flows import outage

        opened = open_store(store)
        try:
            tables = outage.wait_out("store", opened.tables, transient=(StoreError,))
            if tables or table is not None:
                spec = choose_table(opened, table)
        finally:
            opened.close()
    if spec is not None:
        embedder = query_embedder(spec, model, device=settings.device, dtype=settings.dtype)
        document_prompt = spec.prompt_name
        model_name = spec.model_id
    else:
        if store is not None:
            log.warning(
                "%s has no tables yet: serving %s; /search waits for the sink's first table", store, model
            )
        embedder = Embedder.load(
            model or settings.model,
            device=settings.device,
            dtype=settings.dtype,
            truncate_dim=settings.truncate_dim,
        )
        document_prompt = settings.prompt_name
        model_name = embedder.model_id
    try:
        prompts = {
            None: embedder.resolve_prompt(),
            "query": embedder.resolve_prompt(query_prompt_name(embedder)),
            "document": embedder.resolve_prompt(document_prompt),
        }
    except ValueError as e:
        raise SearchError(f"the documents' prompt: {e}") from None
    names = {model_name, embedder.model_id, model or settings.model}
    matryoshka = settings.serve_matryoshka
    if matryoshka is None:
        source = model or settings.model
        if spec is not None and model is None:
            source = "default" if spec.model_id == models.DEFAULT_MODEL_ID else spec.model_id
        matryoshka = names_matryoshka(Path(models.resolve(source)))
    sparse = None
    if spec is not None and spec.sparse is not None:
        try:
            sparse = query_sparse_encoder(spec, sparse_model or settings.sparse_model, device=settings.device)
        except SearchError as e:
            log.warning("%s: /search goes without the sparse signal", e)
    reranker = load_reranker(rerank, device=settings.device, dtype=settings.dtype) if rerank else None
    return Served(
        embedder=embedder,
        model_name=model_name,
        names=frozenset(n for n in names if n),
        prompts=prompts,
        matryoshka=matryoshka,
        store_url=store,
        # The table found at start stays the one searched, whatever tables come later.
        table=spec.name if spec is not None else table,
        spec=spec,
        sparse=sparse,
        reranker=reranker,
    )


def names_matryoshka(model_dir: Path) -> bool:
    """Whether the model card says the model was trained for shortened vectors."""
    try:
        card = (model_dir / "README.md").read_text(encoding="utf-8", errors="replace").lower()
    except OSError:
        return False
    return "matryoshka" in card or "mrl" in card.split()
