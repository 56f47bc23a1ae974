// fastsched host helper: the per-step checks of step() and the loop of zero_grad() in C++.
//
// step() may reuse its device tables only if every parameter, gradient and state is where the
// tables say. In Python that costs ~0.25 us a parameter (p.grad, two data_ptr() calls, the
// state dicts; 2-vCPU EPYC), more than torch's own `[p.grad for p in params]` (0.065 us) the
// whole per-step budget is measured against; here it is ~0.012 us a parameter. Built at run
// time against the installed torch (fastsched/optim/_hostext.py): it reads the at::Tensor
// behind each Python object, which needs torch's headers and so cannot be built at install.
//
// Only objects of exactly torch.Tensor / nn.Parameter are read here; anything else (tensor
// subclasses, DTensor, a parameter list that is not a list) makes check() answer "slow path"
// and zero_grads() use Python's setattr, so both behave as the Python code they replace.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace {

PyObject* g_params = nullptr;      // "params"
PyObject* g_grad = nullptr;        // "grad"
PyTypeObject* g_parameter = nullptr;  // torch.nn.Parameter (set by init())

inline bool plain(PyObject* o) {
    PyTypeObject* t = Py_TYPE(o);
    return t == g_parameter || t == reinterpret_cast<PyTypeObject*>(THPVariableClass);
}

inline int64_t address(const at::Tensor& t) {
    return reinterpret_cast<int64_t>(t.const_data_ptr());
}

// the parameter list of a param_groups entry (a borrowed reference), or nullptr
inline PyObject* params_of(PyObject* group) {
    if (!PyDict_Check(group)) return nullptr;
    PyObject* ps = PyDict_GetItemWithError(group, g_params);
    return ps != nullptr && PyList_Check(ps) ? ps : nullptr;
}

constexpr long SLOW = -1;  // check(): something else changed, take the Python path

// a parameter's shape and strides in one number (FNV-1a): `p.data = p.data.t()` keeps the
// address and changes the layout the tables were built for
inline int64_t layout_of(const at::Tensor& p) {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](int64_t v) { h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull; };
    mix(p.dim());
    for (int64_t v : p.sizes()) mix(v);
    for (int64_t v : p.strides()) mix(v);
    return static_cast<int64_t>(h);
}

// check(param_groups, n, pptr, gptr, layouts, state, states, values, group_sizes) -> int
//
// pptr / gptr / layouts: addresses of int64[n] arrays with the data pointers of the n
// parameters and of their gradients (0: no gradient) and the parameters' layout_of, in
// param_groups order, as the tables were built for them; group_sizes: the parameters of each
// group (a tuple). Returns SLOW when a parameter moved, changed its shape or strides, changed
// group or is not a plain tensor, the set of parameters with a
// gradient changed, a gradient is laid out differently from its parameter (the kernels walk
// both as one flat array) or has no strided storage, or the state dicts differ from `states`
// (identity, order) or the objects in them from `values` (identity, order: a state tensor
// replaced inside its dict); else the number of gradients at new addresses, written
// into gptr (the caller rewrites the gradient column of its tables); gptr is written only then.
PyObject* check(PyObject*, PyObject* args) {
    PyObject *groups, *state, *states, *values, *sizes;
    Py_ssize_t n;
    unsigned long long pa, ga, la;
    if (!PyArg_ParseTuple(args, "OnKKKO!OOO", &groups, &n, &pa, &ga, &la, &PyDict_Type, &state,
                          &states, &values, &sizes))
        return nullptr;
    if (!PyList_Check(groups) || !PyList_Check(states) || !PyList_Check(values) ||
        !PyTuple_Check(sizes) ||
        PyTuple_GET_SIZE(sizes) != PyList_GET_SIZE(groups))
        return PyLong_FromLong(SLOW);
    const int64_t* lay = reinterpret_cast<const int64_t*>(la);
    const int64_t* pptr = reinterpret_cast<const int64_t*>(pa);
    int64_t* gptr = reinterpret_cast<int64_t*>(ga);
    // gradients at new addresses, written into gptr only once everything else is known to
    // match (a SLOW answer leaves gptr as it was)
    std::vector<std::pair<Py_ssize_t, int64_t>> moved;
    Py_ssize_t i = 0;
    try {
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(groups); k++) {
            PyObject* ps = params_of(PyList_GET_ITEM(groups, k));
            if (ps == nullptr) {
                if (PyErr_Occurred()) return nullptr;
                return PyLong_FromLong(SLOW);
            }
            const Py_ssize_t m = PyList_GET_SIZE(ps);
            // the same parameters in the same order and the same group sizes: the same groups
            if (i + m > n || m != PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, k)))
                return PyLong_FromLong(SLOW);
            for (Py_ssize_t j = 0; j < m; j++, i++) {
                PyObject* o = PyList_GET_ITEM(ps, j);
                if (!plain(o)) return PyLong_FromLong(SLOW);
                const at::Tensor& p = THPVariable_Unpack(o);
                if (!p.has_storage() || address(p) != pptr[i] || layout_of(p) != lay[i])
                    return PyLong_FromLong(SLOW);
                const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
                int64_t a = 0;
                if (g.defined()) {
                    if (g.layout() != c10::kStrided || !g.has_storage())
                        return PyLong_FromLong(SLOW);
                    if (p.is_contiguous() ? !g.is_contiguous() : g.strides() != p.strides())
                        return PyLong_FromLong(SLOW);
                    a = address(g);
                }
                if ((a == 0) != (gptr[i] == 0)) return PyLong_FromLong(SLOW);
                if (a != gptr[i]) moved.emplace_back(i, a);
            }
        }
    } catch (...) {  // a c10::Error from a tensor without data: the Python path says what
        return PyLong_FromLong(SLOW);
    }
    if (i != n) return PyLong_FromLong(SLOW);
    // the per-parameter state dicts: the same objects in the same order (a state reset by
    // opt.state.clear() or opt.state[p] = {} rebuilds the tables, as in torch), and the same
    // objects in them, in order (opt.state[p]["exp_avg"] = t rebuilds: torch reads t at once)
    if (PyDict_GET_SIZE(state) != PyList_GET_SIZE(states)) return PyLong_FromLong(SLOW);
    Py_ssize_t pos = 0, j = 0, v = 0;
    const Py_ssize_t nv = PyList_GET_SIZE(values);
    PyObject *key, *value, *skey, *svalue;
    while (PyDict_Next(state, &pos, &key, &value)) {
        if (value != PyList_GET_ITEM(states, j++) || !PyDict_Check(value))
            return PyLong_FromLong(SLOW);
        Py_ssize_t spos = 0;
        while (PyDict_Next(value, &spos, &skey, &svalue))
            if (v >= nv || svalue != PyList_GET_ITEM(values, v++)) return PyLong_FromLong(SLOW);
    }
    if (v != nv) return PyLong_FromLong(SLOW);
    for (const auto& [k, a] : moved) gptr[k] = a;
    return PyLong_FromSsize_t(static_cast<Py_ssize_t>(moved.size()));
}

// layouts(param_groups, n, out): layout_of every parameter into int64 out[n]; False (nothing
// written past what was read) when a parameter is not a plain tensor or the count differs
PyObject* layouts(PyObject*, PyObject* args) {
    PyObject* groups;
    Py_ssize_t n;
    unsigned long long oa;
    if (!PyArg_ParseTuple(args, "OnK", &groups, &n, &oa)) return nullptr;
    if (!PyList_Check(groups)) Py_RETURN_FALSE;
    int64_t* out = reinterpret_cast<int64_t*>(oa);
    Py_ssize_t i = 0;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(groups); k++) {
        PyObject* ps = params_of(PyList_GET_ITEM(groups, k));
        if (ps == nullptr) {
            PyErr_Clear();
            Py_RETURN_FALSE;
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(ps); j++, i++) {
            PyObject* o = PyList_GET_ITEM(ps, j);
            if (i >= n || !plain(o)) Py_RETURN_FALSE;
            out[i] = layout_of(THPVariable_Unpack(o));
        }
    }
    if (i != n) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

// zero_grads(param_groups): p.grad = None for every parameter (torch's zero_grad with
// set_to_none=True); objects other than plain tensors go through their own setattr
PyObject* zero_grads(PyObject*, PyObject* groups) {
    if (!PyList_Check(groups)) {
        PyErr_SetString(PyExc_TypeError, "param_groups must be a list");
        return nullptr;
    }
    // references held on the group, its parameter list and the parameter while it is used, and
    // the sizes read again every iteration: a subclass's grad setter or a finalizer run by
    // freeing a gradient (Python code) may change the lists while this loops (no copies: an
    // allocation here can start a garbage collection, which costs more than the loop)
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(groups); k++) {
        PyObject* g = PyList_GET_ITEM(groups, k);
        Py_INCREF(g);
        PyObject* ps = params_of(g);
        if (ps == nullptr) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a parameter group without a 'params' list");
            Py_DECREF(g);
            return nullptr;
        }
        Py_INCREF(ps);
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(ps); j++) {
            PyObject* o = PyList_GET_ITEM(ps, j);
            Py_INCREF(o);
            int rc = 0;
            if (plain(o))
                THPVariable_Unpack(o).mutable_grad().reset();
            else
                rc = PyObject_SetAttr(o, g_grad, Py_None);
            Py_DECREF(o);
            if (rc < 0) {
                Py_DECREF(ps);
                Py_DECREF(g);
                return nullptr;
            }
        }
        Py_DECREF(ps);
        Py_DECREF(g);
    }
    Py_RETURN_NONE;
}

PyObject* init(PyObject*, PyObject* parameter) {
    if (!PyType_Check(parameter)) {
        PyErr_SetString(PyExc_TypeError, "init() takes torch.nn.Parameter");
        return nullptr;
    }
    Py_INCREF(parameter);
    Py_XDECREF(reinterpret_cast<PyObject*>(g_parameter));
    g_parameter = reinterpret_cast<PyTypeObject*>(parameter);
    Py_RETURN_NONE;
}

PyObject* version(PyObject*, PyObject*) { return PyLong_FromLong(3); }

PyMethodDef methods[] = {
    {"check", check, METH_VARARGS,
     "check(param_groups, n, pptr, gptr, layouts, state, states, values, group_sizes) -> "
     "int: -1 (rebuild) or the number of gradients that moved (gptr rewritten)."},
    {"layouts", layouts, METH_VARARGS, "layouts(param_groups, n, out) -> bool"},
    {"zero_grads", zero_grads, METH_O, "zero_grads(param_groups): every p.grad = None."},
    {"init", init, METH_O, "init(torch.nn.Parameter)"},
    {"version", version, METH_NOARGS, "The interface version of this module."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastsched_host", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_fastsched_host() {
    g_params = PyUnicode_InternFromString("params");
    g_grad = PyUnicode_InternFromString("grad");
    if (g_params == nullptr || g_grad == nullptr) return nullptr;
    return PyModule_Create(&module);
}
