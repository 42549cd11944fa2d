"""
The two spellings of a cluster config, read into one neutral shape.

The seed's line format (C{key: value} lines, C{server:}/C{backup:} opening
blocks) and the YAML twin (C{options:}, C{sources:}, C{backups:}) both read
into a L{Document}: global options and blocks of C{(key, value, line)}
entries, every value still the text the operator wrote.  Checking values and
building the frozen L{cluster_backup.config.Cluster} happens once, in
C{config.py}, so both formats give the same errors with the same lines.
"""

from __future__ import annotations

import re
from typing import Optional

import yaml
from attrs import define, field

#: Block-opening keys and the kind of block they open.
BLOCK_KEYS = {"server": "source", "source": "source", "backup": "store", "store": "store"}


class SyntaxProblems(Exception):
    """
    The text could not be read at all (a YAML syntax error); C{problems} is
    a list of (line, message).  Lines the line format cannot read are no
    exception: they are L{Document.problems}, and every other line is still
    read.
    """

    def __init__(self, problems: list[tuple[int, str]]):
        super().__init__(problems)
        self.problems = problems


@define
class Entry:
    """One C{key: value} as written: normalized key, raw value, 1-based line."""

    key: str
    value: str
    line: int


@define
class Block:
    """A C{server:} or C{backup:} block: its head (C{host:/path}) and keys."""

    kind: str  # "source" or "store"
    head: Entry
    entries: list[Entry] = field(factory=list)
    #: The head could not be read (its problem is already in
    #: L{Document.problems}): the keys are still checked, but the block
    #: builds nothing.
    broken: bool = False


@define
class Document:
    """A config file read but not yet checked."""

    options: list[Entry] = field(factory=list)
    blocks: list[Block] = field(factory=list)
    # Block keys seen before any block: reported by the checker, with lines.
    stray: list[Entry] = field(factory=list)
    #: (line, message) of what could not be read; the rest still is.
    problems: list[tuple[int, str]] = field(factory=list)


def normalize_key(key: str) -> str:
    """
    C{"KEEP_DELETED"}, C{"keep-deleted"} and C{"Keep  deleted"} all mean
    C{"keep deleted"}: keys are matched case-insensitively, with C{_}, C{-}
    and runs of spaces alike.
    """
    return re.sub(r"[\s_\-]+", " ", key.strip()).lower()


def looks_like_yaml(text: str) -> bool:
    """
    True when the text's first meaningful line is a YAML top-level section
    (C{options:}, C{sources:}, C{backups:} or C{stores:} with nothing after
    the colon), which the line format never writes.
    """
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "---":
            continue
        key, colon, rest = line.partition(":")
        return bool(colon) and not rest.strip() and normalize_key(key) in (
            "options", "sources", "backups", "stores")
    return False


def _strip_comment(line: str) -> str:
    # '#' starts a comment at the start of a line or after white space, so a
    # path such as /srv/a#b keeps its '#'.
    match = re.search(r"(^|\s)#", line)
    return line[: match.start()] if match else line


def read_lines(text: str) -> Document:
    """
    Read the seed's line format.  C{options: KEY: VALUE} or a bare
    C{KEY: VALUE} before the first block is a global option; C{server:}
    (alias C{source:}) and C{backup:} (alias C{store:}) open a block and the
    keys after them belong to it.  A bare key after the first block is kept
    in the block; the checker says when it is a global option written in the
    wrong place.

    A line that cannot be read is a problem in L{Document.problems}, and
    the other lines are still read.  One that starts with C{server},
    C{backup} (or their aliases) but cannot be read still opens a (broken)
    block, so the keys after it are checked in their own block rather than
    in the one before.
    """
    doc = Document()
    problems = doc.problems
    current: Optional[Block] = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        first = normalize_key(key).split(" ")[0]
        if not colon or not key.strip() or (
                first != normalize_key(key) and (first in BLOCK_KEYS or first == "options")):
            if colon and key.strip():
                problems.append((number, f"missing ':' after {first!r} in {raw.strip()!r}"))
            else:
                problems.append((number, f"expected 'key: value', got {raw.strip()!r}"))
            if first in BLOCK_KEYS:
                current = Block(BLOCK_KEYS[first], Entry(first, "", number), broken=True)
                doc.blocks.append(current)
            continue
        key = normalize_key(key)
        value = value.strip()
        if key == "options":
            okey, ocolon, ovalue = value.partition(":")
            if not ocolon or not okey.strip():
                problems.append(
                    (number, f"expected 'options: KEY: VALUE', got {raw.strip()!r}"))
                continue
            doc.options.append(Entry(normalize_key(okey), ovalue.strip(), number))
        elif key in BLOCK_KEYS:
            current = Block(BLOCK_KEYS[key], Entry(key, value, number))
            doc.blocks.append(current)
        elif current is None:
            doc.stray.append(Entry(key, value, number))
        else:
            current.entries.append(Entry(key, value, number))
    return doc


def _scalar_text(node: yaml.Node) -> str:
    if node.tag == "tag:yaml.org,2002:null":
        return ""
    return str(node.value)


def _values(node: yaml.Node, key: str, problems: list) -> list[tuple[str, int]]:
    """A scalar, or a list of scalars (for keys such as C{exclude})."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        return [(_scalar_text(node), line)]
    if isinstance(node, yaml.SequenceNode):
        out = []
        for item in node.value:
            if isinstance(item, yaml.ScalarNode):
                out.append((_scalar_text(item), item.start_mark.line + 1))
            else:
                problems.append((item.start_mark.line + 1, f"{key}: expected a plain value"))
        return out
    problems.append((line, f"{key}: expected a value or a list of values"))
    return []


def _mapping(node: yaml.Node, what: str, problems: list) -> list[tuple[str, yaml.Node, int]]:
    if not isinstance(node, yaml.MappingNode):
        problems.append((node.start_mark.line + 1, f"{what}: expected a mapping of 'key: value'"))
        return []
    seen: dict[str, int] = {}
    out = []
    for knode, vnode in node.value:
        kline = knode.start_mark.line + 1
        if not isinstance(knode, yaml.ScalarNode):
            problems.append((kline, f"{what}: keys must be plain words"))
            continue
        key = normalize_key(str(knode.value))
        if key in seen:
            problems.append((kline, f"duplicate key {knode.value!r} (first at line {seen[key]})"))
            continue
        seen[key] = kline
        out.append((key, vnode, kline))
    return out


def read_yaml(text: str) -> Document:
    """
    Read the YAML twin::

        options: {PORT: 5005}
        sources:
          - server: host1:/path/to/directory
            copies: 2
        backups:
          - backup: host3:/path/for/backups
            size: 100gb

    Values are taken as the text written (C{2}, C{100gb}), so both formats
    share one checker.  A YAML syntax error stops the reading (the parser
    cannot go on after one): it is raised as L{SyntaxProblems}, with its
    line and column and where the construct it broke started.  Problems of
    shape (a list where a value belongs, an entry without C{server:}, an
    unknown section) are L{Document.problems}: the rest is still read.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise SyntaxProblems([_yaml_syntax_problem(e)])
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise SyntaxProblems([(1, "YAML syntax error: nested too deeply")])
    except ValueError as e:  # PyYAML's int() of a huge %YAML version number
        raise SyntaxProblems([(1, f"YAML syntax error: {str(e)[:200]}")])
    doc = Document()
    problems = doc.problems
    if root is None:
        return doc
    for key, node, line in _mapping(root, "top level", problems):
        if key == "options":
            for okey, onode, oline in _mapping(node, "options", problems):
                for value, vline in _values(onode, okey, problems):
                    doc.options.append(Entry(okey, value, vline))
        elif key in ("sources", "backups", "stores"):
            _read_yaml_blocks(doc, key, node, problems)
        else:
            problems.append(
                (line, f"unknown top-level key {key!r}: expected options, sources or backups"))
    return doc


def _yaml_syntax_problem(e: yaml.YAMLError) -> tuple[int, str]:
    """C{(line, message)} of a PyYAML error: line, column, and what it broke."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is None:
        return 1, f"YAML syntax error: {str(e)[:200]}"
    problem = getattr(e, "problem", None) or str(e)
    message = f"YAML syntax error at column {mark.column + 1}: {problem}"
    context, where = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and where is not None and where is not mark:
        construct = re.sub(r"^while (parsing|scanning) (an? |the )?", "", context)
        message += (f" (in the {construct} that starts at line {where.line + 1}, "
                    f"column {where.column + 1})")
    return mark.line + 1, message


def _read_yaml_blocks(doc: Document, section: str, node: yaml.Node, problems: list) -> None:
    kind = "source" if section == "sources" else "store"
    heads = [k for k, v in BLOCK_KEYS.items() if v == kind]
    if isinstance(node, yaml.ScalarNode) and _scalar_text(node) == "":
        return
    if not isinstance(node, yaml.SequenceNode):
        problems.append((node.start_mark.line + 1, f"{section}: expected a list of blocks"))
        return
    for item in node.value:
        if not isinstance(item, yaml.MappingNode):
            _mapping(item, section, problems)  # says what is wrong with it
            continue
        entries = _mapping(item, section, problems)
        head = [(k, v, l) for k, v, l in entries if k in heads]
        if len(head) == 1:
            hkey, hnode, hline = head[0]
            hvalues = _values(hnode, hkey, problems)
            block = Block(kind, Entry(hkey, hvalues[0][0] if hvalues else "", hline),
                          broken=not hvalues)
        else:
            problems.append((
                item.start_mark.line + 1,
                f"each entry of {section} needs exactly one of "
                + " or ".join(repr(h) for h in heads)))
            # Its other keys are still checked, in a block that builds nothing.
            block = Block(kind, Entry(heads[0], "", item.start_mark.line + 1), broken=True)
        for key, vnode, _ in entries:
            if key in heads:
                continue
            for value, vline in _values(vnode, key, problems):
                block.entries.append(Entry(key, value, vline))
        doc.blocks.append(block)
