"""MessagePack codec for the wire messages in common.messages. Never pickle.

Wire shape: a top-level message is the array ``[TAG, field0, field1, ...]`` in dataclass field order;
nested dataclasses are positional arrays too; `SamplingParams` travels as its dict (so its validation
runs on decode); fields annotated `TokenIds` or `BlockIds` travel as packed little-endian int32 bytes.

Every dataclass in common.messages with a `TAG` is registered automatically, so adding a message kind is
just defining its class there; classes elsewhere use the `@register` decorator. Each class gets a generated
encoder/decoder pair (built once from its annotations), so the per-step hot path is straight-line code.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
import types
import typing
from typing import Any, Callable, TypeVar, Union

import msgpack

from headrace.common import messages
from headrace.common.sampling_params import SamplingParams

T = TypeVar("T")
Conv = Callable[[Any], Any]


class MessageDecodeError(ValueError):
    """Bytes that are not a well-formed message of a known kind. Receivers log it and carry on."""


# --------------------------------------------------------------------------- packed token ids


class _PackedIds:
    """Stands for the `TokenIds` and `BlockIds` aliases while annotations are resolved (the aliases
    themselves are just list[int])."""


# The annotation names that mean "a list of int32 ids, packed".
_PACKED_ALIASES = ("TokenIds", "BlockIds")


# Compiled little-endian int32 layouts for the short lists of a decode step; longer ones use struct's own cache.
_SHORT = [struct.Struct(f"<{n}i") for n in range(65)]


def pack_ids(ids: list[int]) -> bytes:
    n = len(ids)
    return _SHORT[n].pack(*ids) if n <= 64 else struct.pack(f"<{n}i", *ids)


def unpack_ids(data: bytes) -> list[int]:
    if not isinstance(data, bytes) or len(data) % 4:
        raise MessageDecodeError(f"token ids must be int32 bytes, got {type(data).__name__} of size "
                                 f"{len(data) if isinstance(data, bytes) else '?'}")
    n = len(data) // 4
    return list(_SHORT[n].unpack(data) if n <= 64 else struct.unpack(f"<{n}i", data))


# --------------------------------------------------------------------------- per-type converters

_SP_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _sp_encode(sp: SamplingParams) -> dict[str, Any]:
    # Same keys as SamplingParams.to_dict, without asdict's deep copy (msgpack writes tuples as arrays).
    return {name: getattr(sp, name) for name in _SP_FIELDS}


def _sp_decode(data: Any) -> SamplingParams:
    if not isinstance(data, dict):
        raise MessageDecodeError("sampling_params must be a map")
    return SamplingParams.from_dict(data)


# Types with their own wire form: type -> (encode, decode).
_CUSTOM: dict[type, tuple[Conv, Conv]] = {SamplingParams: (_sp_encode, _sp_decode)}


def _optional(conv: tuple[Conv, Conv]) -> tuple[Conv, Conv]:
    enc, dec = conv
    return (lambda v: None if v is None else enc(v)), (lambda v: None if v is None else dec(v))


def _listed(conv: tuple[Conv, Conv]) -> tuple[Conv, Conv]:
    enc, dec = conv
    return (lambda v: [enc(x) for x in v]), (lambda v: [dec(x) for x in _expect(v, list)])


def _mapped(conv: tuple[Conv, Conv]) -> tuple[Conv, Conv]:
    enc, dec = conv
    return ((lambda v: {k: enc(x) for k, x in v.items()}),
            (lambda v: {k: dec(x) for k, x in _expect(v, dict).items()}))


def _expect(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise MessageDecodeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _converter(tp: Any) -> tuple[Conv, Conv] | None:
    """(encode, decode) for a resolved annotation, or None where msgpack carries the value as is."""
    if tp is _PackedIds or any(tp is getattr(messages, alias) for alias in _PACKED_ALIASES):
        return pack_ids, unpack_ids
    if tp in _CUSTOM:
        return _CUSTOM[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        codec = _struct(tp)
        return codec.encode_fields, codec.decode_fields
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = [_converter(a) for a in args if a is not type(None)]
        real = [c for c in arms if c is not None]
        if not real:
            return None
        if len(arms) > 1:
            raise TypeError(f"unsupported union {tp}: at most one arm may need conversion")
        return _optional(real[0])
    if origin is list and args:
        inner = _converter(args[0])
        return None if inner is None else _listed(inner)
    if origin is dict and len(args) == 2:
        inner = _converter(args[1])
        return None if inner is None else _mapped(inner)
    if origin is tuple:  # msgpack writes tuples as arrays; read them back as tuples
        return (lambda v: v), (lambda v: tuple(_expect(v, list)))
    return None


_NONE = type(None)
_PLAIN_KINDS: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float), bool: (bool,),
                                             bytes: (bytes,), list: (list,), dict: (dict,), tuple: (list,)}


def _wire_kinds(tp: Any) -> tuple[type, ...] | None:
    """The Python types msgpack yields for a plain (unconverted) field, or None where anything goes."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        kinds: tuple[type, ...] = ()
        for arm in typing.get_args(tp):
            arm_kinds = (_NONE,) if arm is _NONE else _wire_kinds(arm)
            if arm_kinds is None:
                return None
            kinds += arm_kinds
        return kinds
    return _PLAIN_KINDS.get(origin or tp)


# --------------------------------------------------------------------------- per-class codecs


def _resolve(cls: type, annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    namespace = dict(vars(sys.modules[cls.__module__]))
    namespace.update(dict.fromkeys(_PACKED_ALIASES, _PackedIds))
    try:
        return eval(annotation, namespace)  # our own source's annotations, never wire data
    except Exception as e:
        raise TypeError(f"cannot resolve annotation {annotation!r} of {cls.__name__}: {e}") from e


class _StructCodec:
    """Positional encode/decode for one dataclass, generated once from its annotations.

    Both directions are generated straight-line functions ("[o.a, c1(o.b)]", "cls(a[0], d1(a[1]))"), so the
    per-step hot path has no per-field loop or reflection. Field names come from our own classes only.
    """

    def __init__(self, cls: type):
        fields = [f for f in dataclasses.fields(cls) if f.init]
        assert all(f.name.isidentifier() for f in fields)
        required = sum(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       for f in fields)
        ns: dict[str, Any] = {"cls": cls, "bad": _bad_field}
        enc_items, dec_lines = [], []
        for i, f in enumerate(fields):
            tp = _resolve(cls, f.type)
            conv = _converter(tp)
            kinds = None if conv else _wire_kinds(tp)
            # Fields with defaults may be absent at the end (the class's defaults apply).
            present = "" if i < required else f"n > {i} and "
            if conv is not None:
                ns[f"e{i}"], ns[f"d{i}"] = conv
                enc_items.append(f"e{i}(o.{f.name})")
                dec_lines.append(f"    if {present}True: a[{i}] = d{i}(a[{i}])")
            else:
                enc_items.append(f"o.{f.name}")
                if kinds is not None:  # a wrong plain type fails here, not deep inside the receiver
                    ns[f"k{i}"] = kinds
                    dec_lines.append(f"    if {present}not isinstance(a[{i}], k{i}): bad(cls, {i}, a[{i}])")
        src = (f"def encode_fields(o):\n    return [{', '.join(enc_items)}]\n"
               "def decode_fields(v, start=0):\n"
               "    if type(v) is not list: bad(cls, -1, v)\n"
               "    a = v[start:] if start else v\n"
               "    n = len(a)\n"
               f"    if n < {required} or n > {len(fields)}: bad(cls, -2, a)\n"
               + "".join(line + "\n" for line in dec_lines)
               + "    return cls(*a)\n")
        exec(src, ns)
        self.encode_fields: Callable[[Any], list[Any]] = ns["encode_fields"]
        self.decode_fields: Callable[..., Any] = ns["decode_fields"]


def _bad_field(cls: type, index: int, value: Any) -> None:
    """index -1: not an array; -2: wrong number of fields; else that field has the wrong type."""
    if index == -2:
        raise MessageDecodeError(f"{cls.__name__}: wrong number of fields ({len(value)})")
    where = "the message" if index == -1 else f"field {index}"
    raise MessageDecodeError(f"{cls.__name__}: {where} is a {type(value).__name__}")


_structs: dict[type, _StructCodec] = {}
_by_tag: dict[str, type] = {}


def _struct(cls: type) -> _StructCodec:
    codec = _structs.get(cls)
    if codec is None:
        codec = _structs[cls] = _StructCodec(cls)
    return codec


def register(cls: type[T]) -> type[T]:
    """Make a dataclass with a `TAG` class attribute encodable as a top-level message (usable as a decorator)."""
    tag = getattr(cls, "TAG", None)
    if not isinstance(tag, str) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass with a str TAG")
    if _by_tag.get(tag, cls) is not cls:
        raise TypeError(f"duplicate message TAG {tag!r}: {_by_tag[tag].__name__} and {cls.__name__}")
    _by_tag[tag] = cls
    return cls


def registered() -> dict[str, type]:
    return dict(_by_tag)


for _cls in list(vars(messages).values()):
    if isinstance(_cls, type) and dataclasses.is_dataclass(_cls) and isinstance(getattr(_cls, "TAG", None), str):
        register(_cls)


# --------------------------------------------------------------------------- entry points


def encode(msg: Any) -> bytes:
    cls = type(msg)
    tag = getattr(cls, "TAG", None)
    if _by_tag.get(tag) is not cls:  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__} is not a registered message")
    values = _struct(cls).encode_fields(msg)
    values.insert(0, tag)
    return msgpack.packb(values, use_bin_type=True)


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Bytes -> message. Anything malformed raises MessageDecodeError, never anything else."""
    try:
        values = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise MessageDecodeError(f"not msgpack: {e}") from None
    if not isinstance(values, list) or not values or not isinstance(values[0], str):
        raise MessageDecodeError("a message must be an array starting with its tag")
    cls = _by_tag.get(values[0])
    if cls is None:
        raise MessageDecodeError(f"unknown message tag {values[0]!r}")
    try:
        return _struct(cls).decode_fields(values, 1)
    except MessageDecodeError:
        raise
    except Exception as e:  # wrong field types, failed validation (SamplingParamsError), ...
        raise MessageDecodeError(f"bad {cls.__name__}: {type(e).__name__}: {e}") from None
