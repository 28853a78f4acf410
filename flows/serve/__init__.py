"""``embedstream serve``: the pipeline's model over HTTP for the applications that query
its vectors. OpenAI-compatible embeddings, search over the store the sink keeps, and
dynamic batching of concurrent requests (docs/serving.md).

- :mod:`flows.serve.served`: which model is served, with which prompts;
- :mod:`flows.serve.batching`: the bounded queue and the batcher;
- :mod:`flows.serve.schema`: the OpenAI request, response and error shapes;
- :mod:`flows.serve.auth`: the API key;
- :mod:`flows.serve.metrics`: the server's Prometheus metrics;
- :mod:`flows.serve.app`: the routes.
"""
