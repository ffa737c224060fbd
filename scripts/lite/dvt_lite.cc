// MindSpore Lite 2.0's converter and runtime, driven from C++: the only Lite on the package index is a CPython
// 3.7 wheel, so scripts/check_lite.sh compiles this against the wheel's include/ and lib/ instead.
//
//   dvt_lite convert MODEL.onnx OUTPUT_PREFIX
//       ONNX -> OUTPUT_PREFIX.ms (converter::kFmkTypeOnnx, saved as kMindIR_Lite, inputs kept NCHW: by default
//       the converter turns a 4-d input into NHWC)
//   dvt_lite run MODEL.ms OUTPUT_PREFIX INPUT0.bin:D0,D1,... [INPUT1.bin:D0,D1,... ...]
//       one forward on the CPU: each input is raw float32 of the given shape, which must be the model's, in
//       its input order; writes OUTPUT_PREFIX<k>.bin per output and prints "output <k> <d0>,<d1>,..." per output.
//
// Any failure is one line on stderr ("dvt_lite: ...", with Lite's own status message) and exit code 1.
// Run it in its own process: the wheel's libmindspore_core.so is not MindSpore 2.10's.

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/status.h"
#include "include/api/types.h"
#include "include/registry/converter_context.h"

namespace mindspore {
struct ConverterPara;

// The wheel ships libmindspore_converter.so without converter.h: these are the members it exports
// (nm -DC), with strings as std::vector<char> like the rest of the API. Its constructor writes one
// std::shared_ptr<ConverterPara> (16 bytes) and nothing else, so that is the whole object.
class Converter {
 public:
  Converter(converter::FmkType fmk_type, const std::vector<char> &model_file, const std::vector<char> &output_file,
            const std::vector<char> &weight_file);
  void SetInputFormat(Format format);
  void SetSaveType(ModelType save_type);
  Status Convert();

 private:
  std::shared_ptr<ConverterPara> data_;
};
}  // namespace mindspore

namespace {

int Fail(const std::string &message) {
  std::cerr << "dvt_lite: " << message << std::endl;
  return 1;
}

std::vector<char> Chars(const std::string &text) { return std::vector<char>(text.begin(), text.end()); }

int Convert(const std::string &onnx, const std::string &output_prefix) {
  mindspore::Converter converter(mindspore::converter::kFmkTypeOnnx, Chars(onnx), Chars(output_prefix), Chars(""));
  converter.SetInputFormat(mindspore::NCHW);
  converter.SetSaveType(mindspore::kMindIR_Lite);
  mindspore::Status status = converter.Convert();
  if (status != mindspore::kSuccess) {
    return Fail("converting " + onnx + " failed: " + status.ToString());
  }
  return 0;
}

std::string Dims(const std::vector<int64_t> &shape) {
  std::ostringstream text;
  for (size_t i = 0; i < shape.size(); ++i) {
    text << (i ? "," : "") << shape[i];
  }
  return text.str();
}

int Run(const std::string &model_path, const std::string &output_prefix, const std::vector<std::string> &inputs) {
  auto context = std::make_shared<mindspore::Context>();
  context->MutableDeviceInfo().push_back(std::make_shared<mindspore::CPUDeviceInfo>());
  mindspore::Model model;
  mindspore::Status status = model.Build(model_path, mindspore::kMindIR_Lite, context);
  if (status != mindspore::kSuccess) {
    return Fail("building " + model_path + " failed: " + status.ToString());
  }
  std::vector<mindspore::MSTensor> tensors = model.GetInputs();
  if (tensors.size() != inputs.size()) {
    return Fail(model_path + " takes " + std::to_string(tensors.size()) + " inputs, " +
                std::to_string(inputs.size()) + " given");
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const size_t colon = inputs[i].rfind(':');
    const std::string path = inputs[i].substr(0, colon);
    const std::string model_shape = Dims(tensors[i].Shape());
    if (colon == std::string::npos || inputs[i].substr(colon + 1) != model_shape ||
        tensors[i].DataType() != mindspore::DataType::kNumberTypeFloat32) {
      return Fail("input " + std::to_string(i) + " of " + model_path + " (" + tensors[i].Name() + ") is float32 " +
                  model_shape + ", given " + inputs[i]);
    }
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) {
      return Fail("cannot read " + path);
    }
    const auto bytes = static_cast<size_t>(file.tellg());
    if (bytes != tensors[i].DataSize()) {
      return Fail(path + " holds " + std::to_string(bytes) + " bytes, input " + std::to_string(i) + " needs " +
                  std::to_string(tensors[i].DataSize()));
    }
    file.seekg(0);
    file.read(static_cast<char *>(tensors[i].MutableData()), static_cast<std::streamsize>(bytes));
  }
  std::vector<mindspore::MSTensor> outputs;
  status = model.Predict(tensors, &outputs);
  if (status != mindspore::kSuccess) {
    return Fail("running " + model_path + " failed: " + status.ToString());
  }
  for (size_t k = 0; k < outputs.size(); ++k) {
    if (outputs[k].DataType() != mindspore::DataType::kNumberTypeFloat32) {
      return Fail("output " + std::to_string(k) + " of " + model_path + " is not float32");
    }
    const std::string path = output_prefix + std::to_string(k) + ".bin";
    std::ofstream file(path, std::ios::binary);
    file.write(static_cast<const char *>(outputs[k].Data().get()), static_cast<std::streamsize>(outputs[k].DataSize()));
    if (!file) {
      return Fail("cannot write " + path);
    }
    std::cout << "output " << k << " " << Dims(outputs[k].Shape()) << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  const std::string usage =
      "usage: dvt_lite convert MODEL.onnx OUTPUT_PREFIX | dvt_lite run MODEL.ms OUTPUT_PREFIX INPUT.bin:SHAPE...";
  if (argc == 4 && std::string(argv[1]) == "convert") {
    return Convert(argv[2], argv[3]);
  }
  if (argc >= 5 && std::string(argv[1]) == "run") {
    return Run(argv[2], argv[3], std::vector<std::string>(argv + 4, argv + argc));
  }
  return Fail(usage);
}
