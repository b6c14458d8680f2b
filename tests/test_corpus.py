"""Corpus readers, spec strings, the document-level split and token chunking."""

from __future__ import annotations

import json

import pytest

from ttmm.build.corpus import (
    CorpusError,
    CorpusSpec,
    Document,
    chunk_documents,
    read_corpora,
    read_corpus,
    split_documents,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("wiki", CorpusSpec("wiki", domain="wiki")),
        ("wiki@40", CorpusSpec("wiki", limit=40, domain="wiki")),
        ("stdlib@10", CorpusSpec("stdlib", limit=10, domain="stdlib")),
        ("jsonl:/d/notes.jsonl", CorpusSpec("jsonl", "/d/notes.jsonl", domain="notes")),
        ("jsonl:a.jsonl:body@5", CorpusSpec("jsonl", "a.jsonl", "body", 5, "a")),
        ("code=dir:./src:**/*.py@200", CorpusSpec("dir", "./src", "**/*.py", 200, "code")),
    ],
)
def test_spec_strings_parse(spec, expected):
    assert CorpusSpec.parse(spec) == expected
    assert CorpusSpec.parse(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("books", "unknown kind"),
        ("wiki@0", "at least 1"),
        ("dir:", "needs a path"),
        ("stdlib:/somewhere", "takes no path"),
    ],
)
def test_bad_spec_strings_are_named(spec, message):
    with pytest.raises(CorpusError, match=message):
        CorpusSpec.parse(spec)


def test_wiki_limit_is_a_stable_topic_spread_sample():
    docs, report = read_corpus("wiki@40")
    again, _ = read_corpus("wiki@40")
    assert [d.id for d in docs] == [d.id for d in again]
    assert len(docs) == 40 == report.documents
    assert len({d.label for d in docs}) >= 6  # hash order, not alphabetical: many topics
    assert all(d.domain == "wiki" and d.text and d.label for d in docs)


def test_stdlib_has_no_test_modules():
    docs, _ = read_corpus("stdlib")
    assert len(docs) > 300
    for doc in docs:
        parts = doc.id.split("/")
        assert not parts[-1].startswith("test_"), doc.id
        assert not {"test", "tests", "site-packages", "idle_test"} & set(parts), doc.id
        assert doc.id.endswith(".py") and doc.label is None


def test_folder_reader_skips_and_counts_non_utf8_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document, plain text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document ü")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")  # hidden: never read
    docs, report = read_corpus(f"notes=dir:{tmp_path}")
    assert [d.id for d in docs] == ["notes/a.txt", "notes/sub/b.md"]
    assert report.skipped_non_utf8 == 2
    only_md, _ = read_corpus(f"notes=dir:{tmp_path}:**/*.md")
    assert [d.id for d in only_md] == ["notes/sub/b.md"]


def test_folder_of_only_undecodable_files_is_an_error(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CorpusError, match="no usable documents.*1 non-UTF-8"):
        read_corpus(f"dir:{tmp_path}")


@pytest.mark.parametrize("spec", ["dir:/no/such/folder", "jsonl:/no/such/file.jsonl"])
def test_missing_path_is_a_clear_error(spec):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(spec)


def test_jsonl_reader_fields_ids_labels_and_bad_lines(tmp_path):
    path = tmp_path / "notes.jsonl"
    lines = [
        json.dumps({"id": "n1", "body": "alpha text", "label": "a"}),
        "",
        json.dumps({"body": "beta text"}),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe broken\n")
    docs, report = read_corpus(f"jsonl:{path}:body")
    assert {(d.id, d.text, d.label) for d in docs} == {
        ("notes/n1", "alpha text", "a"),
        ("notes/3", "beta text", None),
    }
    assert report.skipped_non_utf8 == 1
    with pytest.raises(CorpusError, match=r"notes.jsonl:1: no string field 'text'"):
        read_corpus(f"jsonl:{path}")
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"notes.jsonl:2: not valid JSON"):
        read_corpus(f"jsonl:{path}")


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(CorpusError, match="no usable documents"):
        read_corpus(f"jsonl:{path}")


def test_corpora_must_have_distinct_domains(tmp_path):
    with pytest.raises(CorpusError, match="share the domain"):
        read_corpora(["wiki@3", "wiki@5"])
    docs, reports = read_corpora(["wiki@3", "more=wiki@5"])
    assert len(docs) == 8 and set(reports) == {"wiki", "more"}


def _docs(n: int, domain: str = "d") -> list[Document]:
    return [Document(id=f"{domain}/{i}", text=f"text {i}", domain=domain) for i in range(n)]


def test_split_is_deterministic_disjoint_and_stable_under_growth():
    docs = _docs(400)
    split = split_documents(docs, 0.2, seed=3)
    again = split_documents(docs, 0.2, seed=3)
    assert [d.id for d in split.test] == [d.id for d in again.test]
    test_ids = {d.id for d in split.test}
    assert test_ids.isdisjoint(d.id for d in split.train)
    assert len(test_ids) + len(split.train) == 400
    assert 50 <= len(test_ids) <= 110
    grown = split_documents(docs + _docs(100, "other"), 0.2, seed=3)
    assert test_ids <= {d.id for d in grown.test}  # adding documents moves none of the old ones
    assert {d.id for d in split_documents(docs, 0.2, seed=4).test} != test_ids
    assert split.ids_by_domain()["d"]["test"] == [d.id for d in split.test]


def test_split_rejects_bad_fractions_and_all_test():
    with pytest.raises(CorpusError, match="test_fraction"):
        split_documents(_docs(5), 1.0)
    assert split_documents(_docs(5), 0.0).test == []


def test_chunks_are_token_windows_of_the_document(smol_tokenizer):
    docs, _ = read_corpus("stdlib@3")
    chunks = chunk_documents(docs, smol_tokenizer, window=64, min_tokens=16)
    for doc in docs:
        ids = smol_tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        mine = [c for c in chunks if c.doc_id == doc.id]
        joined = [t for c in mine for t in c.token_ids]
        assert joined == ids[: len(joined)]  # consecutive windows, in order, nothing skipped
        assert len(ids) - len(joined) < 16  # only a tail below min_tokens is dropped
        assert all(16 <= len(c.token_ids) <= 64 for c in mine)
        assert all(c.domain == "stdlib" and c.text for c in mine)


def test_overlapping_windows_tiny_documents_and_caps(smol_tokenizer):
    long_doc = Document("d/long", " ".join(f"word{i}" for i in range(300)), "d")
    tiny = Document("d/tiny", "hi", "d")
    chunks = chunk_documents([long_doc, tiny], smol_tokenizer, window=32, stride=16, min_tokens=8)
    assert {c.doc_id for c in chunks} == {"d/long"}
    assert chunks[0].token_ids[16:] == chunks[1].token_ids[:16]
    capped = chunk_documents([long_doc], smol_tokenizer, window=32, max_chunks_per_document=2)
    assert len(capped) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"window": 1}, "window"), ({"stride": 65}, "stride"), ({"min_tokens": 0}, "min_tokens")],
)
def test_chunking_rejects_bad_settings(smol_tokenizer, kwargs, field):
    with pytest.raises(CorpusError, match=field):
        chunk_documents(_docs(1), smol_tokenizer, **{"window": 64, **kwargs})
