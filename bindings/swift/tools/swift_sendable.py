"""Swift 6 strict concurrency, as far as a parser can tell (no Swift compiler exists here).

In the hand-written Swift layer, every class, struct and enum declared is `Sendable` (or
`@unchecked Sendable`, which must then say why in a comment in its body), since SDK objects cross
from the SDK's threads to the app's actors; a class that is `Sendable` and not `@unchecked` has
only `let` stored properties; and every stored closure, and every closure parameter marked
`@escaping`, is `@Sendable`. Extensions are skipped (they declare no storage).

usage: swift_sendable.py FILE...   (one line per problem, then a summary; exits 1 on any)
"""
import re
import sys

import tree_sitter_swift
from tree_sitter import Language, Parser

PARSER = Parser(Language(tree_sitter_swift.language()))


def text(src, node):
    return src[node.start_byte:node.end_byte].decode(errors="replace")


def check(path):
    src = open(path, "rb").read()
    tree = PARSER.parse(src)
    found = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.type != "class_declaration":
            continue
        kind = node.child(0) if node.child(0).type != "modifiers" else node.child(1)
        if kind is None or text(src, kind) == "extension":
            continue
        name = next((text(src, c) for c in node.children if c.type == "type_identifier"), "?")
        header = text(src, node).split("{", 1)[0]
        line = node.start_point[0] + 1
        body = next((c for c in node.children if c.type in ("class_body", "enum_class_body")), None)
        body_text = text(src, body) if body is not None else ""
        unchecked = "@unchecked" in header
        if not re.search(r"\bSendable\b", header):
            found.append(f"{path}:{line}: {name} is not declared Sendable")
        elif unchecked and not re.search(r"//[^\n]*@unchecked", body_text):
            found.append(f"{path}:{line}: {name} is @unchecked Sendable without a comment saying why")
        elif text(src, kind) == "class" and not unchecked:
            for m in re.finditer(r"^\s*(?:(?:public|private|internal|fileprivate)\s+)?var\s+(\w+)\s*:", body_text, re.M):
                found.append(f"{path}:{line}: Sendable class {name} has a stored var {m.group(1)}")
    source = src.decode(errors="replace")
    for i, row in enumerate(source.splitlines(), 1):
        stored = re.search(r"\blet\s+\w+\s*:\s*(\([^)]*\)\s*->)", row)
        if stored and "@Sendable" not in row:
            found.append(f"{path}:{i}: a stored closure that is not @Sendable: {row.strip()}")
        if "@escaping" in row and not re.search(r"@escaping\s+@Sendable", row):
            found.append(f"{path}:{i}: an @escaping closure that is not @Sendable: {row.strip()}")
    return found


def main(paths):
    problems = [p for path in paths for p in check(path)]
    for p in problems:
        print(p)
    print(f"{len(paths)} files, {len(problems)} Sendable problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
