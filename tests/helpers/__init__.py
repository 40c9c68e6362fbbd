"""Code that several test modules share (fixtures live in tests/conftest.py). A test module imports
from here or from conftest, never from another test module; these modules may import conftest,
conftest imports none of them."""
