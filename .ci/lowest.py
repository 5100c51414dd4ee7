"""Print `name==floor` for each runtime dependency in pyproject.toml: the lowest versions CI tests."""

import re
import tomllib

for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, floor = re.fullmatch(r"([\w.-]+)>=([\w.]+)(?:,<[\w.]+)?", requirement).groups()
    print(f"{name}=={floor}")
