import subprocess
import sys


def test_engine_imports_no_framework_and_no_storage_client():
    code = (
        "import sys, plangate.engine; "
        "print(','.join(m for m in ('starlette', 'werkzeug', 'uvicorn', 'redis', 'flask', 'django', 'fastapi') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == ""
