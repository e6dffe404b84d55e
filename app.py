"""GenAI Studio: `python app.py --help` lists the settings (each also an environment variable)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no call home unless the user opts in (--analytics)

from studio.config import ConfigError, load_settings  # noqa: E402
from studio.runtime import create_studio  # noqa: E402
from studio.server import launch  # noqa: E402


def main() -> None:
    settings = load_settings()
    try:
        studio = create_studio(settings)
    except ConfigError as exc:
        raise SystemExit(f"studio: error: {exc}") from None
    launch(studio)


if __name__ == "__main__":
    main()
