"""Protobuf messages as Triton's HTTP API writes them in JSON.

protobuf's JSON mapping writes 64-bit integers as strings ("dims": ["16"]) and leaves out fields that hold
their default; Triton's HTTP API writes numbers and every field, and clients index the dicts they get
(``config["max_batch_size"]``, ``stats["model_stats"][0]["inference_count"]``), so the conversion is
protobuf's, with the 64-bit integers turned back into numbers.
"""
from __future__ import annotations

from typing import Any, Dict

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_json(message: Message) -> Dict[str, Any]:
    """``message`` as a JSON-ready dict: .proto field names, defaults included, 64-bit integers as numbers."""
    out = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _numbers(message.DESCRIPTOR, out)
    return out


def _repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 6.31 (label is deprecated there)
    return bool(is_repeated) if is_repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _fix(field: FieldDescriptor, value: Any) -> Any:
    if field.type in _INT64:
        return int(value)
    if field.type == FieldDescriptor.TYPE_MESSAGE and isinstance(value, dict):
        _numbers(field.message_type, value)
    return value


def _numbers(descriptor: Descriptor, out: Dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in out:
            continue
        value = out[field.name]
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            for key in list(value):
                value[key] = _fix(inner, value[key])
        elif _repeated(field):
            out[field.name] = [_fix(field, v) for v in value]
        else:
            out[field.name] = _fix(field, value)


__all__ = ["to_json"]
