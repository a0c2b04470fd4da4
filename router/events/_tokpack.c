/* router.events._tokpack: a msgpack array of token ids -> packed native uint32 bytes.
 *
 * The one piece of KV-event ingestion that is done in C: a BlockStored's token_ids reach the
 * ingester as the raw msgpack of the array (msgspec.Raw), and this turns them into the 4 bytes
 * per token that the block key hashes, without creating a Python int per token.
 *
 * Accepted: a msgpack array (fixarray, array 16, array 32) whose every element is an integer
 * in [0, 2**32) in any msgpack integer encoding, and nothing after it. Anything else returns
 * None, and the caller takes the generic path (which then decides what the payload means).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t be64(const unsigned char *p)
{
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
#else
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
#endif
}

/* Parse one element at *pos; 0 on success with the value in *out, -1 when not a uint32. */
static int parse_u32(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *pos, uint32_t *out)
{
    Py_ssize_t i = *pos;
    if (i >= len)
        return -1;
    unsigned char b = buf[i];
    if (b <= 0x7f) { /* positive fixint */
        *out = b;
        *pos = i + 1;
        return 0;
    }
    Py_ssize_t need;
    switch (b) {
    case 0xcc: case 0xd0: need = 1; break; /* uint 8, int 8 */
    case 0xcd: case 0xd1: need = 2; break; /* uint 16, int 16 */
    case 0xce: case 0xd2: need = 4; break; /* uint 32, int 32 */
    case 0xcf: case 0xd3: need = 8; break; /* uint 64, int 64 */
    default: return -1;                    /* negative fixint, or not an integer */
    }
    if (len - (i + 1) < need)
        return -1;
    const unsigned char *p = buf + i + 1;
    uint64_t v;
    switch (b) {
    case 0xcc: v = p[0]; break;
    case 0xcd: v = be16(p); break;
    case 0xce: v = be32(p); break;
    case 0xcf: v = be64(p); break;
    case 0xd0: if (p[0] & 0x80) return -1; v = p[0]; break;
    case 0xd1: if (p[0] & 0x80) return -1; v = be16(p); break;
    case 0xd2: if (p[0] & 0x80) return -1; v = be32(p); break;
    default: if (p[0] & 0x80) return -1; v = be64(p); break; /* 0xd3 */
    }
    if (v > 0xffffffffULL)
        return -1;
    *out = (uint32_t)v;
    *pos = i + 1 + need;
    return 0;
}

/* parse_u32 for an element with at least 9 bytes after its start: the value is read as 8
 * big-endian bytes and shifted into place, so that the mix of 1-, 2- and 4-byte encodings
 * of real token ids costs no mispredicted branch. */
static inline int parse_u32_fast(const unsigned char *buf, Py_ssize_t *pos, uint32_t *out)
{
    const unsigned char *p = buf + *pos;
    unsigned char b = p[0];
    if (b <= 0x7f) {
        *out = b;
        *pos += 1;
        return 0;
    }
    unsigned kind = (unsigned)b - 0xcc; /* 0..3: uint 8..64, 4..7: int 8..64 */
    if (kind > 7)
        return -1;
    unsigned need = 1u << (kind & 3);
    if ((kind >> 2) & (p[1] >> 7)) /* a negative signed integer */
        return -1;
    uint64_t v = be64(p + 1) >> (64 - 8 * need);
    if (v >> 32)
        return -1;
    *out = (uint32_t)v;
    *pos += 1 + (Py_ssize_t)need;
    return 0;
}

static PyObject *pack_u32_array(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t len = view.len, pos;
    uint64_t n;
    PyObject *result = NULL;
    if (len < 1)
        goto reject;
    if ((buf[0] & 0xf0) == 0x90) {
        n = buf[0] & 0x0f;
        pos = 1;
    } else if (buf[0] == 0xdc && len >= 3) {
        n = be16(buf + 1);
        pos = 3;
    } else if (buf[0] == 0xdd && len >= 5) {
        n = be32(buf + 1);
        pos = 5;
    } else {
        goto reject;
    }
    /* Every element takes at least one byte: a longer count is a truncated payload. */
    if (n > (uint64_t)(len - pos))
        goto reject;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 4));
    if (result == NULL)
        goto done;
    {
        char *dst = PyBytes_AS_STRING(result);
        for (uint64_t k = 0; k < n; k++) {
            uint32_t v;
            int rc = len - pos >= 9 ? parse_u32_fast(buf, &pos, &v) : parse_u32(buf, len, &pos, &v);
            if (rc < 0) {
                Py_CLEAR(result);
                goto reject;
            }
            memcpy(dst + k * 4, &v, 4);
        }
    }
    if (pos != len) {
        Py_CLEAR(result);
        goto reject;
    }
    goto done;
reject:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_u32_array", pack_u32_array, METH_O,
     "pack_u32_array(msgpack_array) -> bytes | None\n\n"
     "Native-order uint32 bytes of a msgpack array of integers in [0, 2**32); None when the\n"
     "buffer is anything else (another type, a value out of range, trailing bytes)."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tokpack", "msgpack token-id arrays -> packed uint32 bytes.", 0,
    methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tokpack(void) { return PyModuleDef_Init(&module); }
