"""`georetina schema`: the JSON Schema editors use, and the README's reference agrees with it."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli.main import main
from pipeline.config import job_schema, train_schema

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Keys whose README values are examples, not defaults (the README says so, by these names).
EXAMPLES = {
    "name",
    "inputs",
    "output.path",
    "model",
    "model.name",
    "model.classes",
    "model.checkpoint",
}


def _readme_job_reference() -> dict:
    """The README's job-file block, with its commented-out inline model settings."""
    text = README.read_text().split("### The job file", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL).group(1)
    reference = yaml.safe_load(block)
    model_lines = [
        line[2:] for line in block.splitlines() if re.match(r"^# ( {2}\w+:|model:)", line)
    ]
    reference["model"] = yaml.safe_load("\n".join(model_lines))["model"]
    return reference


def _node(schema: dict, node: dict) -> dict:
    """A property's schema with $ref and anyOf (object or preset path) resolved."""
    if "$ref" in node:
        return {**schema["$defs"][node["$ref"].rsplit("/", 1)[1]], **node}
    for option in node.get("anyOf", []):
        if "$ref" in option:
            return {**_node(schema, option), **{k: v for k, v in node.items() if k != "anyOf"}}
    return node


def _leaves(schema: dict, node: dict, value: object, path: str):
    """(path, documented value, the schema's property) for each key the value sets."""
    node = _node(schema, node)
    if isinstance(value, dict) and "properties" in node:
        for key, inner in value.items():
            assert key in node["properties"], f"{path + key}: not in the schema"
            yield from _leaves(schema, node["properties"][key], inner, f"{path}{key}.")
    else:
        yield path.rstrip("."), value, node


def test_every_key_of_the_readme_reference_is_in_the_schema_with_its_default():
    schema = job_schema()
    reference = _readme_job_reference()
    leaves = list(_leaves(schema, schema, reference, ""))
    documented = {path for path, _, _ in leaves}
    # The reference names every field of every section (the four the issue found missing too).
    for section in ("model", "tiling", "detect", "merge", "output"):
        fields = set(_node(schema, schema["properties"][section])["properties"])
        assert {f"{section}.{f}" for f in fields} <= documented | {
            "model.threshold_level",
            "model.threshold_min_pixels",
        }, section
    assert {"merge.metric", "merge.class_aware", "merge.mode", "model.aspect_ratios"} <= documented
    for path, value, node in leaves:
        if path in EXAMPLES or path.startswith("inputs"):
            continue
        assert "default" in node, f"{path}: documented as a default, the schema has none"
        assert value == node["default"], f"{path}: README {value!r}, schema {node['default']!r}"


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_files_validate_against_their_schema(path):
    data = yaml.safe_load(path.read_text())
    schema = train_schema() if "data" in data else job_schema()
    jsonschema.Draft202012Validator(schema).validate(data)


def test_the_schema_rejects_a_misspelt_key_and_keeps_descriptions():
    schema = job_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    bad = {"inputs": ["a.tif"], "output": {"path": "out"}, "tiling": {"tile_sise": 256}}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    assert errors and "tile_sise" in errors[0].message
    for name, definition in schema["$defs"].items():
        for key, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"


def test_georetina_schema_prints_it(capsys):
    assert main(["schema", "job"]) == 0
    assert json.loads(capsys.readouterr().out) == job_schema()
    assert main(["schema", "train"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["title"] == "georetina training file"
    assert "optim" in printed["properties"]
