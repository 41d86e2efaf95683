#include "escalation_warning.h"

#include <Python.h>
#include <c10/util/Exception.h>

#include <string>

namespace consequential_ext::cpu {
namespace {

std::string take_python_error() {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  std::string message = "ridge_solve: Python error while warning about the escalated ridge";
  if (PyObject* text = value ? PyObject_Str(value) : nullptr) {
    if (const char* utf8 = PyUnicode_AsUTF8AndSize(text, nullptr)) message += std::string(": ") + utf8;
    Py_DECREF(text);
  }
  PyErr_Clear();
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(traceback);
  return message;
}

}  // namespace

void warn_ridge_escalated(double ridge, double escalated) {
  if (!Py_IsInitialized()) return;
  const PyGILState_STATE gil = PyGILState_Ensure();  // ops run with the GIL released
  PyObject* module = PyImport_ImportModule("consequential_ext.ops.reference");
  PyObject* result =
      module ? PyObject_CallMethod(module, "warn_escalated", "dd", ridge, escalated) : nullptr;
  std::string error;
  if (!result) error = take_python_error();
  Py_XDECREF(result);
  Py_XDECREF(module);
  PyGILState_Release(gil);
  TORCH_CHECK(error.empty(), error);
}

}  // namespace consequential_ext::cpu
