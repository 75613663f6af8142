/* codec_format.h — what the encoder (codec.c) and the decoder (codec_decode.c) share: the tags (codec.h). */
#ifndef TIDE_CODEC_FORMAT_H
#define TIDE_CODEC_FORMAT_H

enum { T_NIL, T_FALSE, T_TRUE, T_INT, T_DOUBLE, T_STRING, T_TABLE, T_STRDEF, T_STRREF };

#endif
