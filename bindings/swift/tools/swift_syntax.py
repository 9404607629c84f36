"""Checks that Swift files parse, with tree-sitter-swift (no Swift compiler exists here).

tree-sitter-swift misreads two valid constructs that UniFFI emits, and only those are masked:
  1. an attribute alone inside an `#if` block:   #if swift(>=5.8) / @_documentation(...) / #endif
  2. the empty tuple `()`, e.g.  let writeReturn = { () }
Any other ERROR node, and every MISSING node, is a failure. Exits 1 on any failure.

usage: swift_syntax.py FILE...      (prints one line per problem, then a summary)
"""
import re
import sys

import tree_sitter_swift
from tree_sitter import Language, Parser

PARSER = Parser(Language(tree_sitter_swift.language()))
ATTRIBUTE = re.compile(rb"^@\w+(\(.*\))?$")


def neighbour(lines, row, step):
    """The nearest non-blank line above (step -1) or below (step +1) `row`, stripped."""
    row += step
    while 0 <= row < len(lines):
        if lines[row].strip():
            return lines[row].strip()
        row += step
    return b""


def masked(node, src, lines):
    text = src[node.start_byte:node.end_byte].strip()
    if text == b"()":
        return True
    row = node.start_point[0]
    return (
        ATTRIBUTE.match(text) is not None
        and node.start_point[0] == node.end_point[0]
        and neighbour(lines, row, -1).startswith(b"#if")
        and neighbour(lines, row, +1) == b"#endif"
    )


def problems(path):
    src = open(path, "rb").read()
    lines = src.splitlines()
    tree = PARSER.parse(src)
    found, ignored = [], 0
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_missing:
            found.append(f"{path}:{node.start_point[0] + 1}: missing {node.type}")
        elif node.type == "ERROR":
            if masked(node, src, lines):
                ignored += 1
                continue
            line = lines[node.start_point[0]].decode(errors="replace").strip()
            found.append(f"{path}:{node.start_point[0] + 1}:{node.start_point[1] + 1}: syntax error near: {line}")
            continue
        stack.extend(node.children)
    return found, ignored


def main(paths):
    failed = 0
    for path in paths:
        found, ignored = problems(path)
        for p in found:
            print(p)
        status = "ok" if not found else "FAILED"
        print(f"{status}: {path} ({len(found)} problems, {ignored} known tree-sitter misreadings masked)")
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
