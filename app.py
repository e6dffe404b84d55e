"""GenAI Studio: `python app.py --help` lists the settings (each also an environment variable)."""

import logging
import os

from studio import spaces

spaces.configure()  # first: HF_HOME on Spaces storage, and ZeroGPU's `spaces` package, before torch and the Hub load
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no call home unless the user opts in (--analytics)

from studio.config import exit_on_config_error, parse_settings  # noqa: E402


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("studio").setLevel(logging.INFO)  # input errors as one line each; internal ones with traceback
    # bitsandbytes (imported by diffusers and transformers) looks for an optional CPU 4-bit kernel package on
    # CPUs with bfloat16 and warns at every start when it is missing; the studio runs 4-bit on CUDA only.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with exit_on_config_error():
        settings = parse_settings()  # before the heavy imports: --help and typos answer at once
        from studio.runtime import create_studio

        studio = create_studio(settings)
        from studio.server import launch

        launch(studio)


if __name__ == "__main__":
    main()
