"""Search a store the sink keeps: embed the query with the table's own model (from the
lineage the table records), then ask the store for the nearest chunks by cosine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

from flows.stores import Hit, Store, StoreConfigError, TableSpec, open_store
from operators import Embedder, EmbedstreamError, models

log = logging.getLogger("embedstream.search")

#: Prompt names models give their query side (sentence-transformers' conventions).
QUERY_PROMPTS = ("query", "search_query", "retrieval.query")


class SearchError(RuntimeError):
    """A search that cannot run as asked: no table, an ambiguous table, a missing model."""


def choose_table(store: Store, table: Optional[str] = None) -> TableSpec:
    tables = store.tables()
    if not tables:
        raise SearchError(f"{store.url} has no tables yet: run `embedstream sink` first")
    if table is None:
        if len(tables) > 1:
            listed = ", ".join(f"{t.name} ({t.model_id}, dim {t.dimension})" for t in tables)
            raise SearchError(f"{store.url} has {len(tables)} tables; choose one with --table: {listed}")
        return tables[0]
    for t in tables:
        if t.name == table:
            return t
    raise SearchError(f"no table {table!r} in {store.url}; tables: {', '.join(t.name for t in tables)}")


def query_embedder(
    spec: TableSpec, model: Optional[str] = None, *, device: str = "cpu", dtype: str = "f32"
) -> Embedder:
    """The table's model: ``model`` if given, else the default model or the model id
    found in the local Hugging Face cache; on ``device`` in ``dtype``."""
    truncate = spec.dimension
    source = model or ("default" if spec.model_id == models.DEFAULT_MODEL_ID else spec.model_id)
    try:
        embedder = Embedder.load(source, device=device, dtype=dtype)
    except EmbedstreamError as e:
        raise SearchError(
            f"the model of table {spec.name}, {spec.model_id} (revision {spec.model_revision}), is not "
            f"available here ({e}); pass its directory with --model"
        ) from None
    if embedder.model_revision != spec.model_revision:
        message = (
            f"{source} has revision {embedder.model_revision}, but table {spec.name} was embedded "
            f"with {spec.model_revision}"
        )
        if model is None:
            raise SearchError(message + "; pass the right model with --model")
        log.warning("%s: the scores may not mean much", message)
    if truncate < embedder.dim:
        embedder = Embedder.load(source, device=device, dtype=dtype, truncate_dim=truncate)
    elif truncate > embedder.dim:
        raise SearchError(
            f"table {spec.name} holds {truncate}-dimensional vectors; {source} makes {embedder.dim}"
        )
    return embedder


def search(
    query: str,
    k: int = 5,
    store: Optional[str] = None,
    table: Optional[str] = None,
    model: Optional[str] = None,
    filters: Optional[dict[str, str]] = None,
) -> list[Hit]:
    """The ``k`` chunks nearest to ``query`` in a table of ``store`` (default: the
    configured store), best first, optionally only those whose metadata has every
    ``key=value`` of ``filters``."""
    from flows.settings import Settings

    if k < 1:
        raise ValueError("k must be at least 1")
    opened = open_store(store or Settings.from_env().store)
    try:
        spec = choose_table(opened, table)
        embedder = query_embedder(spec, model)
        vector = embedder.embed([query], prompt_name=query_prompt_name(embedder))[0]
        return nearest(opened, spec, vector, k, filters)
    finally:
        opened.close()


def query_prompt_name(embedder: Embedder) -> Optional[str]:
    """The model's prompt for queries, if it has one (else its default prompt applies)."""
    return next((p for p in QUERY_PROMPTS if p in embedder.prompts), None)


def nearest(
    opened: Store, spec: TableSpec, vector: Sequence[float], k: int, filters: Optional[dict[str, str]] = None
) -> list[Hit]:
    """The ``k`` chunks of table ``spec`` nearest to the query ``vector``, best first
    (``embedstream serve``'s /search embeds the query in its batcher, then comes here)."""
    return opened.search(spec, [float(x) for x in vector], k, dict(filters or {}))


__all__ = [
    "Hit",
    "SearchError",
    "StoreConfigError",
    "choose_table",
    "nearest",
    "query_embedder",
    "query_prompt_name",
    "search",
]
