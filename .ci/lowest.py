"""Print `name==floor` for each runtime dependency in pyproject.toml: the lowest versions CI tests."""

import re

import tomllib

with open("pyproject.toml", "rb") as f:
    requirements = tomllib.load(f)["project"]["dependencies"]
for requirement in requirements:
    name, floor = re.fullmatch(r"([\w.-]+)>=([\w.]+)(?:,<[\w.]+)?", requirement).groups()
    print(f"{name}=={floor}")
