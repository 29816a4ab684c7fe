// Host harness for csrc/nf4_format.h, built and run by tests/test_csrc_compile.py.
//
// Usage: nf4_format_harness DIR NUMEL BLOCKSIZE NESTED_BLOCKSIZE DOUBLE_QUANT
// Reads DIR/{packed,absmax,quant_map}.bin (+ nested_absmax, nested_quant_map, offset when
// DOUBLE_QUANT is 1), raw little-endian, and writes fp32 results:
//   DIR/absmax_fp32.bin   decode_absmax for every block
//   DIR/by_element.bin    element i = quant_map[code_at(packed, i)] * scale: the byte-wise path
//   DIR/by_word.bin       the same through the kernels' 128-bit path: 16-byte chunks split into four
//                         little-endian 32-bit words decoded by decode_word (byte-wise for the tail)
// The Python test compares these with bitsandbytes and qlora.quant.nf4.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "nf4_format.h"

namespace {

template <class T>
std::vector<T> read_file(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        std::exit(2);
    }
    std::fseek(f, 0, SEEK_END);
    const long bytes = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    std::vector<T> data(static_cast<size_t>(bytes) / sizeof(T));
    if (std::fread(data.data(), sizeof(T), data.size(), f) != data.size()) {
        std::fprintf(stderr, "short read from %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return data;
}

void write_file(const std::string& path, const std::vector<float>& data) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr || std::fwrite(data.data(), sizeof(float), data.size(), f) != data.size()) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s DIR NUMEL BLOCKSIZE NESTED_BLOCKSIZE DOUBLE_QUANT\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    const int64_t numel = std::atoll(argv[2]);
    const int64_t blocksize = std::atoll(argv[3]);
    const int64_t nested_blocksize = std::atoll(argv[4]);
    const bool double_quant = std::atoi(argv[5]) != 0;

    const std::vector<uint8_t> packed = read_file<uint8_t>(dir + "/packed.bin");
    const std::vector<float> quant_map = read_file<float>(dir + "/quant_map.bin");
    std::vector<uint8_t> absmax_u8;
    std::vector<float> absmax_f32, nested_absmax, nested_quant_map, offset;
    qlora::AbsmaxView view{};
    if (double_quant) {
        absmax_u8 = read_file<uint8_t>(dir + "/absmax.bin");
        nested_absmax = read_file<float>(dir + "/nested_absmax.bin");
        nested_quant_map = read_file<float>(dir + "/nested_quant_map.bin");
        offset = read_file<float>(dir + "/offset.bin");
        view.absmax_u8 = absmax_u8.data();
        view.nested_absmax = nested_absmax.data();
        view.nested_quant_map = nested_quant_map.data();
        view.offset = offset.data();
        view.nested_blocksize = nested_blocksize;
    } else {
        absmax_f32 = read_file<float>(dir + "/absmax.bin");
        view.absmax_f32 = absmax_f32.data();
    }

    const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
    std::vector<float> scales(static_cast<size_t>(n_blocks));
    for (int64_t b = 0; b < n_blocks; ++b) {
        scales[b] = qlora::decode_absmax(view, b);
    }
    write_file(dir + "/absmax_fp32.bin", scales);

    std::vector<float> by_element(static_cast<size_t>(numel));
    for (int64_t i = 0; i < numel; ++i) {
        by_element[i] = quant_map[qlora::code_at(packed.data(), i)] * scales[i / blocksize];
    }
    write_file(dir + "/by_element.bin", by_element);

    auto lookup = [&](int code) { return quant_map[code]; };
    std::vector<float> by_word(static_cast<size_t>(numel));
    for (int64_t first = 0; first < numel; first += 32) {
        const float scale = qlora::decode_absmax(view, first / blocksize);
        if (first + 32 <= numel) {
            for (int w = 0; w < 4; ++w) {
                uint32_t word;
                std::memcpy(&word, packed.data() + first / 2 + 4 * w, sizeof(word));  // LE load
                qlora::decode_word(word, scale, lookup, by_word.data() + first + 8 * w);
            }
        } else {
            for (int64_t i = first; i < numel; ++i) {
                by_word[i] = quant_map[qlora::code_at(packed.data(), i)] * scale;
            }
        }
    }
    write_file(dir + "/by_word.bin", by_word);
    return 0;
}
