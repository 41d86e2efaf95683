"""Print the pip requirements of pyproject.toml (dependencies + the named extras), one a line.

The Makefile installs these into its venv after torch, so pyproject.toml stays the one
place dependencies are listed.
"""
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = sys.argv[1:] or list(project.get("optional-dependencies", {}))
reqs = list(project.get("dependencies", []))  # torch: installed first, pinned by setup.py
for extra in extras:
    reqs += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(reqs)))
