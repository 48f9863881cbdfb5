"""The workflow's config as Snakemake hands it over, made what the schema means.

``--config tiling='{cpu_bf16: true}'``: Snakemake parses a block given on the command line as
YAML but keeps its values as text, so a boolean arrives as ``'true'`` and the schema refuses it
("'true' is not of type 'boolean'"). :func:`command_line_booleans` turns such text into the
boolean wherever the schema asks for one, before ``common.smk`` validates the config.
"""

from __future__ import annotations

BOOLEAN_WORDS = {"true": True, "false": False}


def command_line_booleans(cfg: dict, schema: dict) -> dict:
    """``cfg`` (changed in place and returned) with each text value ``true``/``false`` (any case)
    at a key where ``schema`` (a JSON schema, as a dict) wants a boolean made that boolean, in
    blocks at any depth. Anything else is left for the schema to accept or refuse."""
    for key, sub in (schema.get("properties") or {}).items():
        value = cfg.get(key)
        if sub.get("type") == "boolean" and isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
            cfg[key] = BOOLEAN_WORDS[value.lower()]
        elif isinstance(value, dict):
            command_line_booleans(value, sub)
    return cfg
