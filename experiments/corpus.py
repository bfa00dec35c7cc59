"""A real text corpus available offline on any machine that runs Python, and a small BPE tokenizer for it.

The corpus is the running interpreter's own standard library (the ``.py`` files under
``sysconfig.get_paths()["stdlib"]``, read in sorted path order up to ``max_bytes``): real text
(code, docstrings, comments) that every fresh machine has, with nothing to download. A different
Python version has slightly different sources, so token counts and losses differ a little.

The tokenizer is a byte-level BPE (Sennrich et al. 2016; GPT-2's byte variant) in pure Python:
words are split off with GPT-2's pattern, each word is a sequence of byte ids 0-255, and the most
frequent adjacent pair is merged into a new id until the vocabulary has ``vocab_size`` entries.
Every byte has an id, so any text encodes (no unknown token) and decoding gives the text back.

>>> bpe = BytePairEncoding.train("low lower lowest low low", vocab_size=260)
>>> len(bpe.merges), bpe.vocab_size
(4, 260)
>>> ids = bpe.encode("lowest low")
>>> bpe.decode(ids)
'lowest low'
>>> len(ids) < len("lowest low".encode())
True
"""

from __future__ import annotations

import heapq
import json
import re
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

# GPT-2's pre-tokenizer with `re`'s classes (no `regex` package needed), and the underscore counted
# as a letter (Python identifiers: `__init__`, `self_test` are words); whitespace runs stay whole
# except the last space, which goes with the next word. Every character falls in one alternative.
_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def stdlib_dir() -> Path:
    """The running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path, suffixes: Iterable[str] = (".py",)) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, in sorted relative-path order (site-packages left out)."""
    wanted = tuple(suffixes)
    files = [p for p in root.rglob("*") if p.suffix in wanted and p.is_file() and "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_corpus(root: Path | None = None, max_bytes: int = 2_000_000, suffixes: Iterable[str] = (".py",)) -> str:
    """The text of ``root``'s files (default: the standard library), concatenated up to ``max_bytes`` bytes.

    Raises ``FileNotFoundError`` naming the directory when it holds no such file.
    """
    root = stdlib_dir() if root is None else Path(root)
    files = source_files(root, suffixes)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {root}")
    parts, size = [], 0
    for path in files:
        text = path.read_bytes()[: max_bytes - size].decode("utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    return "\n".join(parts)


def words(text: str) -> Iterator[str]:
    """GPT-2-style pre-tokenization: merges never cross these boundaries.

    >>> list(words("def f(x):\\n    return x"))
    ['def', ' f', '(', 'x', '):', '\\n   ', ' return', ' x']
    """
    return (m.group() for m in _WORDS.finditer(text))


class BytePairEncoding:
    """A trained byte-level BPE: ``merges[i]`` is the pair of ids that id ``256 + i`` stands for."""

    def __init__(self, merges: list[tuple[int, int]]) -> None:
        self.merges = merges
        self._rank = {pair: 256 + i for i, pair in enumerate(merges)}
        self._bytes = [bytes([i]) for i in range(256)]
        for a, b in merges:
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BytePairEncoding:
        """Merge the most frequent adjacent pair (ties: the smallest pair) until ``vocab_size`` ids exist.

        Pair counts are updated incrementally (only the words holding the merged pair are rewritten),
        with a lazy max-heap: 2.7 s for 3,840 merges over 2 MB of Python on one core.
        """
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        counts = Counter(words(text))
        seqs = [list(w.encode()) for w in counts]
        freqs = list(counts.values())
        pairs: Counter[tuple[int, int]] = Counter()
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for i, seq in enumerate(seqs):
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += freqs[i]
                where[pair].add(i)
        heap = [(-c, p) for p, c in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while len(merges) < vocab_size - 256 and heap:
            negative, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -negative:
                continue  # a stale entry: the pair's count changed since it was pushed
            if -negative < 2:
                break  # nothing left that occurs twice
            new_id = 256 + len(merges)
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for i in where.pop(pair):
                seq, f = seqs[i], freqs[i]
                for old in zip(seq, seq[1:], strict=False):
                    pairs[old] -= f
                    changed.add(old)
                seq = _merge(seq, pair, new_id)
                seqs[i] = seq
                for new in zip(seq, seq[1:], strict=False):
                    pairs[new] += f
                    where[new].add(i)
                    changed.add(new)
            pairs.pop(pair, None)
            for p in changed:
                if pairs.get(p, 0) > 0:
                    heapq.heappush(heap, (-pairs[p], p))
        return cls(merges)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (each word merged by rank, cached per distinct word)."""
        out: list[int] = []
        for word in words(text):
            ids = self._cache.get(word)
            if ids is None:
                ids = self._encode_word(list(word.encode()))
                self._cache[word] = ids
            out.extend(ids)
        return out

    def _encode_word(self, seq: list[int]) -> list[int]:
        while len(seq) > 1:
            ranked = [(self._rank.get(p, 1 << 30), p) for p in zip(seq, seq[1:], strict=False)]
            rank, pair = min(ranked)
            if rank == 1 << 30:
                break
            seq = _merge(seq, pair, rank)
        return seq

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"merges": self.merges}))

    @classmethod
    def load(cls, path: Path) -> BytePairEncoding:
        return cls([tuple(p) for p in json.loads(Path(path).read_text())["merges"]])


def _merge(seq: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``seq`` with every non-overlapping occurrence of ``pair`` (left to right) replaced by ``new_id``.

    >>> _merge([1, 2, 2, 2, 3], (2, 2), 9)
    [1, 9, 2, 3]
    """
    out, i, a, b = [], 0, pair[0], pair[1]
    n = len(seq)
    while i < n:
        if i + 1 < n and seq[i] == a and seq[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out
