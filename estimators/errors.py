"""Errors that the command line turns into exit code 2 with one clear message."""


class UserInputError(ValueError):
    """Bad input from the user (model spec, strategy, file, shape): exit code 2, no traceback."""


def read_yaml_mapping(path, what: str, empty_ok: bool = False) -> dict:
    """A user's YAML file that must hold a mapping (a profile, requirements, deployments); `what` names it in
    the errors. `empty_ok`: an empty file is an empty mapping."""
    from pathlib import Path

    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserInputError(f"{what} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserInputError(f"cannot read {what}: {exc.strerror or exc}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{what} must be a mapping of fields")
    return data
