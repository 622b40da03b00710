// The Python module `lfvila_kernels._C`. It holds no Python functions: importing it loads the shared library,
// whose static initialisers register the `lfvila_C::` operators (schema.cpp) and their CPU/CUDA kernels.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
