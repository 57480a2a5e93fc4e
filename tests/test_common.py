"""`_common.read_jsonl`: the one JSON-lines reader, for metrics (a bad line voids the rest) and the sweep index
(a torn line sits anywhere and only it is dropped)."""

from __future__ import annotations

from muonft_cli._common import read_jsonl


def test_read_jsonl_torn_lines(tmp_path):
    p = tmp_path / "log.jsonl"
    assert read_jsonl(p) == []
    p.write_text('{"a": 1}\n\n{"a": 2, "tor\n{"a": 3}\n[4]\n{"a": 5')
    assert read_jsonl(p) == [{"a": 1}]
    assert read_jsonl(p, skip_bad=True) == [{"a": 1}, {"a": 3}]
