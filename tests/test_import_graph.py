"""No two modules of the package import each other, directly or through others.

The graph is drawn from the source (every `import` / `from ... import` statement, the late ones
inside functions included, since a late import is how a circle hides), one node per module: a
circle means two modules each need something the other owns, which belongs in one of them.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'dualsig_jax'


def package_modules(root: str = ROOT) -> dict[str, str]:
  """Dotted module name -> file path, for every .py file of the package."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
    dirs[:] = [d for d in dirs if not d.startswith(('.', '_'))]
    for f in files:
      if not f.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(folder, f), root)[: -len('.py')].split(os.sep)
      if rel[-1] == '__init__':
        rel = rel[:-1]
      out['.'.join(rel)] = os.path.join(folder, f)
  return out


def _imported(node, this: str, is_package: bool, modules) -> set[str]:
  """Package modules that one import statement of module `this` loads by name."""
  if isinstance(node, ast.Import):
    return {a.name for a in node.names if a.name in modules}
  base = node.module or ''
  if node.level:  # relative: from the module's package, `level - 1` packages up
    parts = this.split('.') if is_package else this.split('.')[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    base = '.'.join(parts + ([base] if base else []))
  found = set()
  for a in node.names:
    sub = f'{base}.{a.name}'
    if sub in modules:
      found.add(sub)  # `from pkg import submodule`
    elif base in modules:
      found.add(base)  # `from module import name`
  return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """module -> the package modules it imports (at any depth of its source), itself excluded."""
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    is_package = path.endswith('__init__.py')
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import | ast.ImportFrom):
        edges |= _imported(node, name, is_package, modules)
    graph[name] = edges - {name}
  return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
  """The strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = set()
        while True:
          m = stack.pop()
          on_stack.discard(m)
          component.add(m)
          if m == node:
            break
        if len(component) > 1:
          out.append(frozenset(component))
  return out


def test_the_graph_sees_the_package():
  modules = package_modules()
  graph = import_graph(modules)
  assert len(modules) > 40, sorted(modules)
  # Spot checks that edges are read (absolute, from-submodule and late imports).
  assert 'dualsig_jax.models.heads' in graph['dualsig_jax.models.dual_branch']
  assert 'dualsig_jax.models.backbones' in graph['dualsig_jax.models']
  assert 'dualsig_jax.models.backbones' in graph['dualsig_jax.models.heads']  # a late import


def test_circles_finds_a_circle_through_three_modules():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
  assert circles(graph) == [frozenset({'a', 'b', 'c'})]
  assert circles({'a': {'b'}, 'b': set()}) == []


def test_no_import_circle_between_the_package_modules():
  found = circles(import_graph(package_modules()))
  assert not found, (
    f'import circles (move what both need to the module that owns it): {[sorted(c) for c in found]}'
  )
