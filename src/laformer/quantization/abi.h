/* The layout of the structs a kernel takes, as a string the Python side compares with its ctypes mirror at load
 * (laformer.native.check_abi), so a library built from other sources is refused instead of read wrongly:
 *
 *     int prefix_layout(char *out, int capacity) { LAYOUT_BEGIN LAYOUT_STRUCT(Linear) LAYOUT_FIELD(Linear, w) ...
 *                                                  LAYOUT_END }
 *
 * writes "Linear:56 .w@0 ..." (each struct's sizeof, then each field's name and offset) and returns its length.
 * List every field in declaration order: a missing or moved field changes a size or an offset on one side only.
 */
#ifndef LAFORMER_ABI_H
#define LAFORMER_ABI_H
#include <stddef.h>
#include <stdio.h>

#define LAYOUT_BEGIN int written_ = 0;
#define LAYOUT_PUT_(...) \
    written_ += snprintf(out + (written_ < capacity ? written_ : capacity), \
                         written_ < capacity ? (size_t)(capacity - written_) : 0, __VA_ARGS__);
#define LAYOUT_STRUCT(S) LAYOUT_PUT_("%s%s:%zu", written_ ? " " : "", #S, sizeof(S))
#define LAYOUT_FIELD(S, f) LAYOUT_PUT_(" .%s@%zu", #f, offsetof(S, f))
#define LAYOUT_END return written_;
#endif
