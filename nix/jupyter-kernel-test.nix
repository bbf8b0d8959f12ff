# The Jupyter project's kernel conformance suite (tests/test_interactive_kernel.py uses it); not
# in nixpkgs. Hash of the PyPI sdist jupyter_kernel_test-0.7.0.tar.gz.
{
  buildPythonPackage,
  fetchPypi,
  hatchling,
  jupyter-client,
  jsonschema,
}:
buildPythonPackage rec {
  pname = "jupyter_kernel_test";
  version = "0.7.0";
  pyproject = true;
  src = fetchPypi {
    inherit pname version;
    hash = "sha256-B4tv5/dw3RZPlUm916NVZjIlo/+bD3V1rVRtJyOexgk=";
  };
  build-system = [ hatchling ];
  dependencies = [
    jupyter-client
    jsonschema
  ];
  doCheck = false;
  pythonImportsCheck = [ "jupyter_kernel_test" ];
}
