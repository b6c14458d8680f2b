"""The OpenAI-compatible server: `app` wires the endpoints; `batching`, `streaming` and
`responses` run and answer generations; `schemas`, `errors`, `limits` and `metrics` say what
comes in, what goes wrong, what is refused and what was served.
"""
