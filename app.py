"""Hugging Face Spaces entry point (the Space runs `python app.py`); locally use `python -m demo`.

`create()` first prepares the Space (persistent /data, HF_HOME, ZeroGPU's `spaces`
import, all before torch), then starts the app exactly as `python -m demo` does.
"""

from demo.__main__ import create

demo, launch_kwargs = create([])

if __name__ == "__main__":
    demo.launch(**launch_kwargs)
