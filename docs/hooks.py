"""mkdocs hooks (mkdocs.yml `hooks:`): the site's front page is README.md, and a page may link
any file of the repository.

The pages are written to be read on GitHub as much as in the site, so their links are relative
paths in the repository: README.md links `docs/training.md` and `llama_jax/waiting.py`, a guide
links `../llama_jax/waiting.py` and `../experiments/results/ablations/ablations.png`. mkdocs
sees only docs/, so here

  - README.md becomes the site's index.md (one source for the front page);
  - a link to a file of the repository outside docs/ that exists is copied into the site under
    `repo/` and the link pointed there (a module, a config, a plot);
  - a link to anything else is left as written, so `mkdocs build --strict` fails on it (a
    broken link: a file moved or renamed).
"""

from __future__ import annotations

import os
import posixpath
import re

from mkdocs.structure.files import File, InclusionLevel

REPO_PREFIX = "repo"
# A markdown link or image target: ](target) or ](target "title"); not a URL, not an anchor.
_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?((?:\s+\"[^\"]*\")?\))")


def _repo(config) -> str:
  return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _is_external(target: str) -> bool:
  return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target)) or target.startswith("/")


def _source(page_src_uri: str, config) -> str:
  """The repository path of a page's markdown (index.md is README.md; repo/X is X)."""
  if page_src_uri == "index.md":
    return "README.md"
  if page_src_uri.startswith(REPO_PREFIX + "/"):
    return page_src_uri[len(REPO_PREFIX) + 1:]
  docs = os.path.relpath(config["docs_dir"], _repo(config))
  return posixpath.join(docs.replace(os.sep, "/"), page_src_uri)


def resolve(target: str, page_src_uri: str, config) -> str | None:
  """The site path a page's link should take, or None to leave the link as it is."""
  if _is_external(target):
    return None
  repo = _repo(config)
  docs = os.path.relpath(config["docs_dir"], repo).replace(os.sep, "/")
  source = _source(page_src_uri, config)
  in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
  if in_repo.startswith("../"):
    return None  # outside the repository: mkdocs reports it
  if in_repo == "README.md":
    site = "index.md"
  elif in_repo == docs or in_repo.startswith(docs + "/"):
    site = posixpath.relpath(in_repo, docs)
  elif os.path.isfile(os.path.join(repo, in_repo)):
    site = posixpath.join(REPO_PREFIX, in_repo)
  else:
    return None  # not there: mkdocs --strict reports the broken link
  return posixpath.relpath(site, posixpath.dirname(page_src_uri) or ".")


def _links(markdown: str):
  for m in _LINK.finditer(markdown):
    yield m.group(2)


def on_files(files, config):
  repo = _repo(config)
  with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  files.append(File.generated(config, "index.md", content=readme))
  # Every repository file a page links is copied into the site under repo/.
  wanted = set()
  for page in list(files.documentation_pages()):
    text = page.content_string
    for target in _links(text):
      site = resolve(target, page.src_uri, config)
      if site is None:
        continue
      full = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), site))
      if full.startswith(REPO_PREFIX + "/"):
        wanted.add(full[len(REPO_PREFIX) + 1:])
  for path in sorted(wanted):
    # A linked markdown file of the repository (experiments/README.md) is rendered as a page
    # reached by its links, not listed in the nav.
    files.append(File.generated(config, posixpath.join(REPO_PREFIX, path),
                                abs_src_path=os.path.join(repo, path),
                                inclusion=InclusionLevel.NOT_IN_NAV))
  return files


def on_page_markdown(markdown, page, config, files):
  def rewrite(m):
    site = resolve(m.group(2), page.file.src_uri, config)
    if site is None:
      return m.group(0)
    return m.group(1) + site + (m.group(3) or "") + m.group(4)
  return _LINK.sub(rewrite, markdown)
