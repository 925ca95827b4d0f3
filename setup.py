"""Package layout that pyproject.toml cannot express: the top-level asset folders travel inside the wheel."""

from setuptools import find_namespace_packages, setup

# The repository keeps these at its top level; a wheel installs them as app/_assets/<folder>,
# where app/paths.py looks first.
ASSET_FOLDERS = ("templates", "static", "migrations")
ASSET_PACKAGE = "app._assets"


def asset_layout() -> tuple[list[str], dict[str, str]]:
    """Every folder under the asset folders as a data package, and where each top one comes from."""
    packages, package_dir = [], {}
    for folder in ASSET_FOLDERS:
        root = f"{ASSET_PACKAGE}.{folder}"
        package_dir[root] = folder
        subfolders = find_namespace_packages(where=folder, exclude=["__pycache__", "*.__pycache__"])
        packages += [root, *(f"{root}.{sub}" for sub in subfolders)]
    return packages, package_dir


# Folders without __init__.py count too: they hold data such as SQL statements.
code_packages = find_namespace_packages(
    include=["app", "app.*", "workers", "workers.*"], exclude=["*.__pycache__"]
)
asset_packages, asset_dirs = asset_layout()
setup(
    packages=code_packages + asset_packages,
    package_dir=asset_dirs,
    # Every file in a package folder ships: demo data, SQL, templates, vendored scripts.
    package_data={"": ["*"]},
    exclude_package_data={"": ["*.pyc"]},
)
