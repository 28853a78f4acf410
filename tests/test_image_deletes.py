"""Deletes reach every topic that received a document's records: with
`--image-output-topic`, image vectors and manifests go there and text to the output
topic, so a DELETE is published to both, also for a document that changed between image
and text. End to end on the real broker, the real flow and the sink into a real store."""

from __future__ import annotations

from conftest import DATA
from kafka_helpers import FlowTopics, avro_event
from test_incremental import run_sink

from flows.kafka.topics import create
from flows.settings import Settings
from flows.stores import open_store


def stored_docs(url: str) -> set[str]:
    store = open_store(url)
    try:
        return {r["doc_id"] for spec in store.tables() for r in store.rows(spec)}
    finally:
        store.close()


def test_a_delete_reaches_the_image_topic_and_the_output_topic(kafka_bootstrap, tmp_path):
    topics = FlowTopics(kafka_bootstrap)
    images = f"{topics.prefix}.images"
    create(Settings(brokers=kafka_bootstrap), images, 1)
    photo = (DATA / "tiny-clip" / "images" / "big.jpg").read_bytes()
    topics.produce(
        [
            # An image, deleted.
            (b"pic", avro_event("pic", content=photo, filename="pic.jpg")),
            (b"pic", avro_event("pic", op="DELETE")),
            # An image that becomes text, then is deleted: both topics had its records.
            (b"turn", avro_event("turn", content=photo, filename="turn.jpg")),
            (b"turn", avro_event("turn", content=b"now a line of text", filename="turn.txt")),
            (b"turn", avro_event("turn", op="DELETE")),
            # Text, deleted; and a photo and a note that stay.
            (b"note", avro_event("note", content=b"red circles on a wide canvas", filename="n.txt")),
            (b"note", avro_event("note", op="DELETE")),
            (b"keep", avro_event("keep", content=photo, filename="keep.jpg")),
            (b"memo", avro_event("memo", content=b"a memo that stays", filename="m.txt")),
        ]
    )
    topics.run(
        "--image-model",
        str(DATA / "tiny-clip"),
        "--image-output-topic",
        images,
        "--text-with-image-model",
    )

    def deletes(topic: str) -> list[str]:
        return [r["doc_id"] for kind, r, _ in topics.read(topic) if kind == "DeleteMarker"]

    assert deletes(images) == ["pic", "turn", "note"]
    assert deletes(topics.output) == ["pic", "turn", "note"]
    # Each delete follows the records it removes on its topic.
    image_kinds = [(kind, r["doc_id"]) for kind, r, _ in topics.read(images)]
    assert image_kinds.index(("DeleteMarker", "pic")) > image_kinds.index(("DocManifest", "pic"))
    assert image_kinds.index(("DeleteMarker", "turn")) > image_kinds.index(("DocManifest", "turn"))

    # A consumer of each topic ends with only what is still there.
    for topic, left in ((images, {"keep"}), (topics.output, {"memo"})):
        url = f"lancedb:{tmp_path / topic}"
        run_sink(topics, topic, url)
        assert stored_docs(url) == left, topic
