"""rvc_modulator.py reads top to bottom: every top-level definition uses only names that
stand above it (a type annotation in quotes may name one further down). A reader meets
each piece before its first use, and a new piece has one obvious place: below what it
needs, above what needs it.
"""
from __future__ import annotations

import ast
import symtable

from conftest import SCRIPT

NESTED_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _evaluated_here(node: ast.AST):
    """The nodes of `node` evaluated in its own scope: a def's decorators and defaults,
    a class's bases, but not the bodies of functions, classes or comprehensions."""
    todo = [node]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo += node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]
        elif isinstance(node, ast.ClassDef):
            todo += node.decorator_list + node.bases + node.keywords
        elif not isinstance(node, NESTED_SCOPES):
            todo += ast.iter_child_nodes(node)


def _bound(statement: ast.stmt) -> set[str]:
    """Module-level names a top-level statement binds."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    names = set()
    for node in _evaluated_here(statement):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def _unquoted_annotation_names(statement: ast.stmt) -> set[str]:
    annotations = []
    for node in ast.walk(statement):
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    return {n.id for a in annotations if a is not None for n in ast.walk(a) if isinstance(n, ast.Name)}


def _referenced(statement: ast.stmt, scopes: list[symtable.SymbolTable]) -> set[str]:
    """Global names a top-level statement refers to, in its own code and in every scope
    nested in it (function bodies, methods, comprehensions), found by Python's own
    symbol tables, so a local that shadows a module-level name is not counted."""
    names = {n.id for n in _evaluated_here(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    names |= _unquoted_annotation_names(statement)
    first = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
    todo = [s for s in scopes if first <= s.get_lineno() <= statement.end_lineno]
    while todo:
        scope = todo.pop()
        names |= {s.get_name() for s in scope.get_symbols() if s.is_global() and s.is_referenced()}
        todo += scope.get_children()
    return names


def forward_references(source: str) -> list[str]:
    """'definition -> name' for every top-level statement that uses a module-level name
    first bound by a statement further down."""
    body = ast.parse(source).body
    scopes = symtable.symtable(source, "<source>", "exec").get_children()
    first_binding: dict[str, int] = {}
    for position, statement in enumerate(body):
        for name in _bound(statement):
            first_binding.setdefault(name, position)
    found = []
    for position, statement in enumerate(body):
        label = getattr(statement, "name", None) or ast.unparse(statement).splitlines()[0][:40]
        found += [f"{label} (line {statement.lineno}) -> {name}"
                  for name in sorted(_referenced(statement, scopes)) if first_binding.get(name, -1) > position]
    return found


def test_every_definition_uses_only_names_defined_above_it():
    assert forward_references(SCRIPT.read_text(encoding="utf-8")) == []


def test_the_check_finds_a_misplaced_definition():
    misplaced = '''
def convert(x):
    return scale(x) * LIMIT

LIMIT = 2

def scale(x: "Later") -> float:
    return x
'''
    assert forward_references(misplaced) == ["convert (line 2) -> LIMIT", "convert (line 2) -> scale"]


def test_locals_and_quoted_annotations_are_not_forward_references():
    fine = '''
from __future__ import annotations

def area(side: "Square") -> float:
    scale = 2
    return [scale * s for s in (side,)][0]

def unquoted(side: Square) -> None: ...

class Square: ...

scale = 3
'''
    assert forward_references(fine) == ["unquoted (line 8) -> Square"]
