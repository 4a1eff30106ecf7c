"""The MNIST MLCube's toolchain. `nox -l` lists the sessions; `nox -s NAME` runs one."""
import nox

nox.options.sessions = []  # a bare `nox` lists the sessions and runs nothing
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = ["-r", "requirements.txt", "pytest"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest; extra arguments go to pytest)."""
    session.install(*TEST_DEPS)
    session.run("pytest", *session.posargs)
