"""Generate the checked-in contract files from the models.

    python -m schemas.generate          # rewrite schemas/jsonschema/*.json and asyncapi.json
    python -m schemas.generate --check  # exit 1 if the checked-in files drifted

The files are what VNFM vendors integrate against, so they are generated, never hand-edited.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas.deadletter import DeadLetter
from schemas.events import ALL_EVENTS
from schemas.topics import ALL_TOPICS, DEAD_LETTERS_TOPIC, Service, TopicSpec

HERE = Path(__file__).resolve().parent
JSONSCHEMA_DIR = HERE / "jsonschema"
ASYNCAPI_FILE = HERE / "asyncapi.json"
CONTRACT_VERSION = "1.0.0"


def _dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"


def event_schemas() -> dict[str, dict[str, Any]]:
    schemas: dict[str, dict[str, Any]] = {}
    for cls in ALL_EVENTS:
        schema = cls.model_json_schema(mode="serialization")
        schema["$id"] = f"https://escalator.dev/schemas/{cls.__name__}.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schemas[cls.__name__] = schema
    dead = DeadLetter.model_json_schema(mode="serialization")
    dead["$id"] = "https://escalator.dev/schemas/DeadLetter.json"
    dead["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schemas["DeadLetter"] = dead
    return schemas


def _example(cls: type[Any]) -> dict[str, Any]:
    """A full example payload built from the fields' own examples."""
    values: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if field.examples:
            values[name] = field.examples[0]
    instance = cls.model_validate(values)
    return json.loads(instance.model_dump_json())  # type: ignore[no-any-return]


def _role(service: Service) -> str:
    return service.value


def _channel(spec: TopicSpec) -> dict[str, Any]:
    return {
        "address": spec.name,
        "description": spec.description,
        "messages": {
            cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"} for cls in spec.events
        },
        "bindings": {
            "kafka": {
                "bindingVersion": "0.5.0",
                "topicConfiguration": {
                    "cleanup.policy": ["compact"] if spec.compacted else ["delete"],
                },
            }
        },
        "x-escalator": {
            "key": spec.key_field,
            "publishers": [_role(s) for s in spec.producers],
            "subscribers": [_role(s) for s in spec.consumers],
            "vendorWritable": spec.vendor_writable,
            "coPartitioned": spec.co_partitioned,
        },
    }


def asyncapi_document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in ALL_TOPICS:
        channel_id = spec.name.replace(".", "_")
        channels[channel_id] = _channel(spec)
        # AsyncAPI 3.0: an operation names its channel, and its messages by reference into
        # that channel's messages (not into components).
        channel_messages = [
            {"$ref": f"#/channels/{channel_id}/messages/{cls.__name__}"} for cls in spec.events
        ]
        for service in spec.producers:
            operations[f"{service.name.lower()}_sends_{channel_id}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "messages": channel_messages,
                "summary": f"{service.value} publishes to {spec.name}",
            }
        for service in spec.consumers:
            operations[f"{service.name.lower()}_receives_{channel_id}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "messages": channel_messages,
                "summary": f"{service.value} consumes {spec.name}",
            }
        for cls in spec.events:
            messages[cls.__name__] = {
                "name": cls.__name__,
                "title": cls.__name__,
                "summary": (cls.__doc__ or "").strip().splitlines()[0],
                "contentType": "application/json",
                "payload": {"$ref": f"./jsonschema/{cls.__name__}.json"},
                "bindings": {
                    "kafka": {
                        "bindingVersion": "0.5.0",
                        "key": {"type": "string", "description": f"the event's {spec.key_field}"},
                    }
                },
                "examples": [{"name": "example", "payload": _example(cls)}],
            }
    dead_channel = DEAD_LETTERS_TOPIC.replace(".", "_")
    channels[dead_channel] = {
        "address": DEAD_LETTERS_TOPIC,
        "description": "Records a consumer could not use, with the reason; see `escalator dlq`.",
        "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
        "x-escalator": {
            "key": "source topic",
            "publishers": ["every consumer"],
            "subscribers": ["operators (escalator dlq)"],
            "vendorWritable": False,
            "coPartitioned": False,
        },
    }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "contentType": "application/json",
        "payload": {"$ref": "./jsonschema/DeadLetter.json"},
        "examples": [{"name": "example", "payload": _example(DeadLetter)}],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Escalator event contract",
            "version": CONTRACT_VERSION,
            "description": (
                "Topics, keys and events exchanged by Escalator's services and by VNFMs. "
                "Consumers ignore unknown fields; see schemas/README.md for versioning."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def rendered_files() -> dict[Path, str]:
    files = {
        JSONSCHEMA_DIR / f"{name}.json": _dumps(schema) for name, schema in event_schemas().items()
    }
    files[ASYNCAPI_FILE] = _dumps(asyncapi_document())
    return files


def drifted() -> list[str]:
    problems = []
    wanted = rendered_files()
    for path, text in wanted.items():
        if not path.exists() or path.read_text() != text:
            problems.append(f"{path.relative_to(HERE.parent)} is out of date")
    if JSONSCHEMA_DIR.exists():
        for path in JSONSCHEMA_DIR.glob("*.json"):
            if path not in wanted:
                problems.append(f"{path.relative_to(HERE.parent)} has no model any more")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files drifted")
    args = parser.parse_args(argv)
    if args.check:
        problems = drifted()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python -m schemas.generate", file=sys.stderr)
        return 1 if problems else 0
    JSONSCHEMA_DIR.mkdir(exist_ok=True)
    for path in JSONSCHEMA_DIR.glob("*.json"):
        path.unlink()
    for path, text in rendered_files().items():
        path.write_text(text)
    print(f"wrote {len(rendered_files())} files under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
