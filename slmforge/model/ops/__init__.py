"""Sequence operators behind the recurrent mixers: references and chunked PyTorch versions (``scan.py``)."""

from slmforge.model.ops.scan import gla_chunked, gla_ref, segsum, ssd_chunked, ssd_ref

__all__ = ["gla_chunked", "gla_ref", "segsum", "ssd_chunked", "ssd_ref"]
