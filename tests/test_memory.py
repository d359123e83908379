"""Long-term memory (schema 3): remember / recall / memories / forget, FTS5 ranking, hostile queries,
optional embeddings, and `loopterm memory`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopterm.core.errors import ConfigError
from loopterm.core.memory import LongTermMemory
from loopterm.store import Store
from loopterm.store.memory import MAX_TERMS, fts_query, words
from loopterm.tui.cli import main


@pytest.fixture
def store(store_target: str | Path) -> Iterator[Store]:
    """On SQLite (FTS5, bm25), then on PostgreSQL (tsvector, ts_rank_cd)."""
    s = Store.open(store_target)
    yield s
    s.close()


def keys(items: list) -> list[str]:
    return [item.key for item in items]


def fts_in_sync(store: Store) -> None:
    if store.backend != "sqlite":
        return  # PostgreSQL's index is a generated column: it cannot drift
    store._conn.execute("INSERT INTO memory_fts (memory_fts) VALUES ('integrity-check')")


# -- the API ---------------------------------------------------------------------------


def test_store_is_a_long_term_memory(store: Store) -> None:
    assert isinstance(store, LongTermMemory)


def test_remember_list_forget(store: Store) -> None:
    a = store.remember("fixit", "parser", "the parser chokes on tabs", at=100.0, source_run="run1")
    assert (a.loop, a.kind, a.key, a.value, a.source_run, a.created_at, a.updated_at, a.score) == (
        "fixit", "fact", "parser", "the parser chokes on tabs", "run1", 100.0, 100.0, None)
    b = store.remember("fixit", "approach", "rewrite the tokenizer", kind="decision", at=101.0)
    store.remember("other", "parser", "unrelated", at=102.0)
    assert keys(store.memories("fixit")) == ["approach", "parser"]  # most recently updated first
    assert keys(store.memories("fixit", kind="decision")) == ["approach"]
    assert store.memory_loops() == ["fixit", "other"]
    assert store.forget("fixit", "parser") is True
    assert store.forget("fixit", "parser") is False
    assert store.forget("fixit", str(b.id)) is True  # by id when no key is spelled so
    assert store.forget("fixit", "12345") is False
    assert store.memories("fixit") == []
    assert keys(store.memories("other")) == ["parser"]  # another loop's memory is its own
    fts_in_sync(store)


def test_remember_again_replaces_and_keeps_created_at(store: Store) -> None:
    first = store.remember("fixit", "parser", "chokes on tabs", at=100.0)
    second = store.remember("fixit", "parser", "chokes on spaces", kind="decision", at=150.0)
    assert second.id == first.id
    assert (second.created_at, second.updated_at, second.kind, second.value) == (100.0, 150.0, "decision", "chokes on spaces")
    assert len(store.memories("fixit")) == 1
    assert store.recall("fixit", "tabs") == []  # the index forgot the old value
    assert keys(store.recall("fixit", "spaces")) == ["parser"]
    fts_in_sync(store)


def test_a_key_that_looks_like_an_id_wins_over_the_id(store: Store) -> None:
    first = store.remember("l", "a", "x")
    store.remember("l", str(first.id), "named like an id")
    assert store.forget("l", str(first.id)) is True
    assert keys(store.memories("l")) == ["a"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.remember("bad name", "k", "v"), "bad loop name 'bad name'"),
        (lambda s: s.remember("../etc", "k", "v"), "bad loop name"),
        (lambda s: s.remember("l", "k", "v", kind="rumour"), "unknown memory kind 'rumour'"),
        (lambda s: s.remember("l", "  ", "v"), "non-empty key"),
        (lambda s: s.recall("no/such", "x"), "bad loop name"),
        (lambda s: s.memories("l", kind="nope"), "unknown memory kind"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(store: Store, call, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        call(store)
    assert "\n" not in str(info.value)
    assert store.memories("l") == []


def test_memory_persists_across_reopen(store_target: str | Path) -> None:
    path = store_target
    with Store.open(path) as s:
        s.remember("fixit", "parser", "the parser chokes on tabs", source_run="r1")
        s.remember("fixit", "doc", "A long document. " * 500, kind="document")
    with Store.open(path, create=False) as s:
        assert keys(s.recall("fixit", "tabs parser")) == ["parser"]
        assert keys(s.recall("fixit", "document")) == ["doc"]
        assert s.memories("fixit", kind="fact")[0].source_run == "r1"


# -- full-text ranking ---------------------------------------------------------------------


def corpus(store: Store) -> None:
    filler = ["the build uses make", "coverage report is uploaded nightly", "docs live in the wiki",
              "release notes are generated", "the linter runs in CI", "style: black and ruff",
              "the database is SQLite", "logs rotate daily"]
    for i, text in enumerate(filler):
        store.remember("fixit", f"note{i}", text)
    store.remember("fixit", "tokenizer", "splits on whitespace")  # the word in the key
    store.remember("fixit", "bug", "the tokenizer mishandles tabs; the tokenizer must keep tabs")  # twice in the value
    store.remember("fixit", "aside", "a tokenizer exists somewhere in a very long paragraph " + "filler " * 60)
    store.remember("elsewhere", "tokenizer", "another loop's tokenizer note")


def test_recall_ranks_by_bm25_and_stays_in_the_loop(store: Store) -> None:
    corpus(store)
    found = store.recall("fixit", "tokenizer", limit=10)
    assert keys(found) == ["tokenizer", "bug", "aside"]  # key weighs double; a long value ranks last
    assert all(item.loop == "fixit" for item in found)
    scores = [item.score for item in found]
    assert all(s is not None and s > 0 for s in scores) and scores == sorted(scores, reverse=True)
    assert keys(store.recall("fixit", "tokenizer", limit=1)) == ["tokenizer"]
    assert store.recall("fixit", "tokenizer", limit=0) == []


def test_recall_matches_any_word_and_stems(store: Store) -> None:
    corpus(store)
    # words are joined with OR: an item matching both words comes first
    assert keys(store.recall("fixit", "tabs whitespace", limit=3))[:2] in (["bug", "tokenizer"], ["tokenizer", "bug"])
    assert keys(store.recall("fixit", "rotating logs")) == ["note7"]  # porter: rotating ~ rotate
    assert keys(store.recall("fixit", "SQLITE")) == ["note6"]  # case-insensitive
    assert store.recall("fixit", "kubernetes") == []


HOSTILE = ['"', '""', '"tabs', "tabs\"", "*", "tabs*", "AND", "OR", "NOT", "NOT tabs", "tabs AND", "NEAR(", "NEAR(tabs",
           "NEAR(tabs whitespace, 2)", "-", "-tabs", "^tabs", "key:tabs", "value : tabs", "(", ")", "((tabs", "{key}: x",
           "", "   ", "\n\t", "\x00", "tabs\x00tabs", "naïve café", "日本語のテキスト", "नमस्ते दुनिया", "🚀🔥", "‮tabs",
           "'; DROP TABLE memory; --", "tabs " * 500, "+", "tabs + whitespace", "a:b:c", "x\"y\"z"]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(store: Store, query: str) -> None:
    corpus(store)
    store.remember("fixit", "unicode", "naïve café 日本語のテキスト नमस्ते दुनिया")
    found = store.recall("fixit", query, limit=20)
    if not words(query):
        assert found == []
    if "tabs" in query:
        assert "bug" in keys(found)
    assert len(store.memories("fixit")) == 12  # nothing dropped


def test_unicode_words_are_found(store: Store) -> None:
    store.remember("fixit", "unicode", "naïve café 日本語 नमस्ते दुनिया")
    assert keys(store.recall("fixit", "cafe")) == ["unicode"]  # diacritics folded
    assert keys(store.recall("fixit", "नमस्ते")) == ["unicode"]
    assert keys(store.recall("fixit", "日本語")) == ["unicode"]


def test_fts_query_quotes_every_word() -> None:
    assert fts_query('NEAR(parser "tabs" AND -x*') == '"NEAR" OR "parser" OR "tabs" OR "AND" OR "x"'
    assert fts_query("") == "" and fts_query(' " * - ( ') == ""
    assert fts_query("a A a b") == '"a" OR "b"'
    assert len(words(" ".join(f"w{i}" for i in range(100)))) == MAX_TERMS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=60))
def test_any_text_is_a_valid_query(store: Store, query: str) -> None:
    if not store.memories("fixit"):
        corpus(store)
    store.recall("fixit", query)


# -- embeddings (optional) ---------------------------------------------------------------

VOCAB = {"car": 0, "automobile": 0, "vehicle": 0, "tabs": 1, "whitespace": 1, "spaces": 1, "database": 2, "sqlite": 2}


def fake_embed(calls: list[list[str]]):
    """A deterministic embedding: a bag of concepts, so synonyms without a shared word are close."""

    def embed(texts: list[str]) -> list[list[float]]:
        calls.append(list(texts))
        vectors = []
        for text in texts:
            v = [0.0, 0.0, 0.0, 0.01]
            for word in words(text.lower()):
                if word in VOCAB:
                    v[VOCAB[word]] += 1.0
            vectors.append(v)
        return vectors

    return embed


def test_recall_with_embeddings_blends_cosine_with_bm25(store: Store) -> None:
    calls: list[list[str]] = []
    embed = fake_embed(calls)
    store.remember("fixit", "ride", "the automobile is parked outside", embedding=embed(["automobile"])[0])
    store.remember("fixit", "storage", "we keep rows in sqlite")
    store.remember("fixit", "car wash", "on fridays")
    calls.clear()
    found = store.recall("fixit", "car", embed=embed)
    # "car wash" matches the word and the concept; "ride" only the concept, from its stored vector
    assert keys(found) == ["car wash", "ride"]
    assert calls == [["car", "car wash\non fridays"]]  # one call: the query and the candidate without a vector
    assert found[0].score is not None and found[1].score is not None and found[0].score > found[1].score
    stored = store._conn.execute("SELECT embedding FROM memory WHERE key = 'car wash'").fetchone()[0]
    assert json.loads(stored) == [1.0, 0.0, 0.0, 0.01]  # kept for next time
    calls.clear()
    assert keys(store.recall("fixit", "vehicle", embed=embed)) == ["car wash", "ride"]  # no shared word at all
    assert calls == [["vehicle"]]
    # a new value drops the stale vector; the same value keeps it
    store.remember("fixit", "car wash", "on fridays")
    assert store._conn.execute("SELECT embedding IS NOT NULL FROM memory WHERE key = 'car wash'").fetchone()[0] == 1
    store.remember("fixit", "car wash", "closed for good")
    assert store._conn.execute("SELECT embedding FROM memory WHERE key = 'car wash'").fetchone()[0] is None
    assert store.recall("fixit", "   ", embed=embed) == []


def test_a_bad_embed_function_is_reported(store: Store) -> None:
    store.remember("fixit", "car", "a car")
    with pytest.raises(ValueError, match="expected one per text"):
        store.recall("fixit", "car", embed=lambda texts: [[1.0]])
    with pytest.raises(ValueError, match="finite"):
        store.recall("fixit", "car", embed=lambda texts: [[math.nan]] * len(texts))
    with pytest.raises(ValueError, match="finite"):
        store.remember("fixit", "x", "y", embedding=[])


# -- the command line ----------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_memory_cli_add_list_search_forget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
    code, out, _ = cli(capsys, "memory", "fixit", "list", "--db", db)
    assert code == 0 and "remembers nothing yet" in out and not Path(db).exists()  # reading creates nothing
    code, out, _ = cli(capsys, "memory", "fixit", "add", "parser", "[bold]chokes[/bold] on tabs", "--db", db)
    assert code == 0 and "remembered 'parser' for loop fixit (fact" in out
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nThe tokenizer splits on tabs.\n", encoding="utf-8")
    code, out, _ = cli(capsys, "memory", "--db", db, "fixit", "add", "notes", "--file", str(doc))
    assert code == 0 and "(document" in out
    code, out, _ = cli(capsys, "memory", "fixit", "add", "plan", "rewrite it", "--kind", "decision", "--db", db)
    assert code == 0
    code, out, _ = cli(capsys, "memory", "fixit", "list", "--db", db)
    assert code == 0 and "[bold]chokes[/bold] on tabs" in out  # markup shown literally
    assert out.index("plan") < out.index("notes") < out.index("parser")
    code, out, _ = cli(capsys, "memory", "fixit", "list", "--kind", "decision", "--json", "--db", db)
    assert [item["key"] for item in json.loads(out)] == ["plan"]
    code, out, _ = cli(capsys, "memory", "fixit", "search", 'tabs NEAR( "', "--json", "--db", db)
    found = json.loads(out)
    assert code == 0 and {item["key"] for item in found} == {"parser", "notes"} and all(item["score"] > 0 for item in found)
    code, out, _ = cli(capsys, "memory", "fixit", "search", "tabs", "--limit", "1", "--db", db)
    assert code == 0 and out.count("fixit") == 0 and ("parser" in out) != ("notes" in out)
    code, out, _ = cli(capsys, "memory", "fixit", "search", "kubernetes", "--db", db)
    assert code == 0 and "nothing in loop fixit's memory matches" in out
    code, out, _ = cli(capsys, "memory", "fixit", "forget", "parser", "--db", db)
    assert code == 0 and "forgot 'parser'" in out
    code, out, _ = cli(capsys, "memory", "fixit", "--db", db)  # no action: list
    assert code == 0 and "parser" not in out and "plan" in out


def test_memory_cli_shows_untrusted_text_safely(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
    assert cli(capsys, "memory", "fixit", "add", "evil", "\x1b[2Jgone\x07 \u202eabc", "--db", db)[0] == 0
    code, out, _ = cli(capsys, "memory", "fixit", "list", "--db", db)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2Jgone\\x07" in out and "\\u202e" in out
    code, out, _ = cli(capsys, "memory", "fixit", "list", "--json", "--db", db)
    assert json.loads(out)[0]["value"] == "\x1b[2Jgone\x07 \u202eabc"  # JSON keeps the exact text, escaped


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["memory", "bad name", "list"], "bad loop name 'bad name'"),
        (["memory", "fixit", "forget", "nothing"], "has no memory with key or id 'nothing'"),
        (["memory", "fixit", "add", "k"], "give the text as VALUE or with --file PATH"),
        (["memory", "fixit", "add", "k", "v", "--file", "x"], "give the text as VALUE or with --file PATH"),
        (["memory", "fixit", "add", "k", "--file", "{tmp}/missing.txt"], "cannot read"),
        (["memory", "fixit", "add", "k", "--file", "{tmp}/binary.bin"], "is not UTF-8 text"),
        (["memory", "fixit", "add", " ", "v"], "non-empty key"),
    ],
)
def test_memory_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                                 expect: str) -> None:
    db = tmp_path / "cli.db"
    with Store.open(db) as s:
        s.remember("fixit", "kept", "value")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00\x81")
    code, out, err = cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv], "--db", str(db))
    assert code == 2 and err.count("\n") == 1 and err.startswith("loopterm: ") and expect in err, err
    with Store.open(db) as s:
        assert keys(s.memories("fixit")) == ["kept"]


def test_memory_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["memory", "fixit", "add", "k", "v", "--kind", "rumour"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--kind" in err
